//! The small fast upstream every target proxies to: a bare hyper HTTP/1.1 server that answers
//! `GET /mib` with 1 MiB and anything else with a few bytes, after draining the request body.
//! It runs as its own process (`stepgate-bench upstream`) so its CPU is nobody's but its own.

use std::io::Write;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The small answer: a short JSON body, so the small-GET figures measure the proxy hop.
const SMALL: &[u8] = b"{\"ok\":true}\n";

/// 1 MiB: the large-body workload's response size.
pub const MIB: usize = 1 << 20;

/// Listens on a free loopback port, prints the port on stdout (the parent reads it), serves.
pub fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("upstream runtime")?;
    runtime.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{port}")?;
    stdout.flush()?;
    let mib = Bytes::from(vec![b'x'; MIB]);
    loop {
        let (stream, _) = listener.accept().await?;
        // Like the gate's own sockets: small answers must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let mib = mib.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                answer(request, mib.clone())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(request: Request<Incoming>, mib: Bytes) -> Result<Response<Full<Bytes>>, String> {
    let large = request.uri().path() == "/mib";
    // Drain (not collect) the upload: the upstream should cost as little as possible.
    let mut body = request.into_body();
    while let Some(frame) = body.frame().await {
        frame.map_err(|e| e.to_string())?;
    }
    let body = if large {
        mib
    } else {
        Bytes::from_static(SMALL)
    };
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())
}
