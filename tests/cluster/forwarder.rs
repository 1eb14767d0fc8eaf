//! A TCP forwarder between a gate and PostgreSQL, so a test can cut the database off and
//! bring it back on the same address without touching the shared PostgreSQL server.
//!
//! Cutting stops accepting (the port is closed: new connections are refused) and drops every
//! live connection (the gate's pooled connections see their socket close), which is what a
//! database that went away looks like from the gate.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::harness::PATIENCE;

type Connections = Arc<Mutex<Vec<JoinHandle<()>>>>;

pub struct TcpForwarder {
    pub port: u16,
    target: String,
    accepting: Option<JoinHandle<()>>,
    connections: Connections,
}

impl TcpForwarder {
    /// Forwards 127.0.0.1:(a free port) to `target` (`host:port`).
    pub async fn start(target: String) -> TcpForwarder {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the forwarder");
        let port = listener.local_addr().expect("forwarder address").port();
        let mut forwarder = TcpForwarder {
            port,
            target,
            accepting: None,
            connections: Arc::default(),
        };
        forwarder.accept_on(listener);
        forwarder
    }

    fn accept_on(&mut self, listener: TcpListener) {
        let target = self.target.clone();
        let connections = self.connections.clone();
        self.accepting = Some(tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    // Out of descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let target = target.clone();
                let connection = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut live = connections.lock().unwrap_or_else(PoisonError::into_inner);
                live.retain(|c| !c.is_finished());
                live.push(connection);
            }
        }));
    }

    /// Closes the port and drops every live connection; returns once all of them are closed.
    pub async fn cut(&mut self) {
        if let Some(accepting) = self.accepting.take() {
            accepting.abort();
            // Awaiting the aborted task means its listener has been dropped: the port is shut.
            let _ = accepting.await;
        }
        let live = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for connection in &live {
            connection.abort();
        }
        for connection in live {
            let _ = connection.await;
        }
    }

    /// Listens on the same port again.
    pub async fn restore(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot listen on port {} again: {error}",
                        self.port
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.accept_on(listener);
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        if let Some(accepting) = self.accepting.take() {
            accepting.abort();
        }
        for connection in self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            connection.abort();
        }
    }
}
