//! Method attacks: a protected change sent with a method the rule does not name, while the
//! exchange's framework reads it as one the rule does. The gate's policy: the method-override
//! headers and a `_method` query parameter are matched *in addition to* the real method (an
//! override can add a hold, never remove one) and the request is forwarded unchanged; `HEAD`
//! and `OPTIONS` are matched as `GET` too, because frameworks route them to GET handlers.
//!
//! The classes: method override (`X-HTTP-Method-Override` from Google's APIs, honoured by
//! ASP.NET Web API, Spring's `HiddenHttpMethodFilter` for `_method`, Rack::MethodOverride,
//! Laravel/Symfony `_method`, Express `method-override`), and HEAD-as-GET routing (Flask,
//! Rails, Go's `http.ServeMux` and Spring all answer HEAD with the GET handler), which turned
//! verb-restricted access rules into bypasses ("HTTP verb tampering", e.g. Java EE
//! `<http-method>` constraints).

use crate::helpers::{
    bare, json, passed, run_table, Attack, Expect, Gate, Row, READ_ONLY, WITHDRAW,
};

use Expect::Held;

const KEY: &str = "/api/v1/api-keys/k1";
const EXPORT: &str = "/api/v1/withdrawal-addresses/export";

const fn with(
    method: &'static str,
    target: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: &'static [u8],
) -> Attack {
    Attack::Http {
        method,
        target,
        headers,
        body,
    }
}

pub static ROWS: &[Row] = &[
    // The control: POST is not a method rule A names, and no override says otherwise.
    Row {
        name: "POST with a withdraw body, no override, passes",
        attack: json("POST", KEY, WITHDRAW),
        expect: passed(KEY),
    },
    // --- Override headers on a method the rule does not name.
    Row {
        name: "POST + X-HTTP-Method-Override: PUT",
        attack: with(
            "POST",
            KEY,
            &[
                ("content-type", "application/json"),
                ("x-http-method-override", "PUT"),
            ],
            WITHDRAW,
        ),
        expect: Held,
    },
    Row {
        name: "POST + X-HTTP-Method: PATCH",
        attack: with(
            "POST",
            KEY,
            &[
                ("content-type", "application/json"),
                ("x-http-method", "PATCH"),
            ],
            WITHDRAW,
        ),
        expect: Held,
    },
    Row {
        name: "POST + X-Method-Override: put (lower case)",
        attack: with(
            "POST",
            KEY,
            &[
                ("content-type", "application/json"),
                ("X-Method-Override", "put"),
            ],
            WITHDRAW,
        ),
        expect: Held,
    },
    Row {
        name: "GET + X-HTTP-Method-Override: PUT",
        attack: with(
            "GET",
            KEY,
            &[
                ("content-type", "application/json"),
                ("x-http-method-override", "PUT"),
            ],
            WITHDRAW,
        ),
        expect: Held,
    },
    Row {
        name: "two override headers, the second one PUT",
        attack: with(
            "POST",
            KEY,
            &[
                ("content-type", "application/json"),
                ("x-http-method-override", "GET"),
                ("x-http-method-override", "PUT"),
            ],
            WITHDRAW,
        ),
        expect: Held,
    },
    Row {
        name: "override as a list: GET, PUT",
        attack: with(
            "POST",
            KEY,
            &[
                ("content-type", "application/json"),
                ("x-http-method-override", "GET, PUT"),
            ],
            WITHDRAW,
        ),
        expect: Held,
    },
    // --- `_method` in the query (Spring's HiddenHttpMethodFilter reads request parameters,
    // which include the query).
    Row {
        name: "POST ?_method=PUT",
        attack: json("POST", "/api/v1/api-keys/k1?_method=PUT", WITHDRAW),
        expect: Held,
    },
    Row {
        name: "POST ?%5Fmethod=PUT",
        attack: json("POST", "/api/v1/api-keys/k1?%5Fmethod=PUT", WITHDRAW),
        expect: Held,
    },
    Row {
        name: "POST ?_METHOD=p%75t among other parameters",
        attack: json("POST", "/api/v1/api-keys/k1?a=1&_METHOD=p%75t", WITHDRAW),
        expect: Held,
    },
    // `_method` in a form body: Rack::MethodOverride, Laravel and Symfony read it from the
    // POST body (that is its usual place, from HTML forms). To such an exchange this is a PUT
    // that adds withdraw, so the gate must hold it.
    Row {
        name: "POST form body _method=PUT",
        attack: with(
            "POST",
            "/api/v3/keys/k1",
            &[("content-type", "application/x-www-form-urlencoded")],
            b"_method=PUT&permissions=withdraw",
        ),
        expect: Held,
    },
    // --- The other direction: an override never removes a hold.
    Row {
        name: "PUT + X-HTTP-Method-Override: GET",
        attack: with(
            "PUT",
            KEY,
            &[
                ("content-type", "application/json"),
                ("x-http-method-override", "GET"),
            ],
            WITHDRAW,
        ),
        expect: Held,
    },
    Row {
        name: "PUT ?_method=GET",
        attack: json("PUT", "/api/v1/api-keys/k1?_method=GET", WITHDRAW),
        expect: Held,
    },
    // An override on a request the rules would not hold anyway is forwarded unchanged.
    Row {
        name: "POST + override PUT with a read-only body is forwarded as sent",
        attack: with(
            "POST",
            KEY,
            &[
                ("content-type", "application/json"),
                ("x-http-method-override", "PUT"),
            ],
            READ_ONLY,
        ),
        expect: crate::helpers::Expect::Passed {
            upstream_path: KEY,
            seen: &[crate::helpers::Seen::Is("x-http-method-override", "PUT")],
        },
    },
    // --- HEAD and OPTIONS on a protected GET (rule D names only GET).
    Row {
        name: "GET on the protected export",
        attack: bare("GET", EXPORT),
        expect: Held,
    },
    Row {
        name: "HEAD on the protected export",
        attack: bare("HEAD", EXPORT),
        expect: Held,
    },
    Row {
        name: "OPTIONS on the protected export",
        attack: bare("OPTIONS", EXPORT),
        expect: Held,
    },
    Row {
        name: "POST + X-HTTP-Method-Override: GET on the export",
        attack: with("POST", EXPORT, &[("x-http-method-override", "GET")], b""),
        expect: Held,
    },
    Row {
        name: "POST ?_method=GET on the export",
        attack: bare("POST", "/api/v1/withdrawal-addresses/export?_method=GET"),
        expect: Held,
    },
    Row {
        name: "POST on the export is another route and passes",
        attack: bare("POST", EXPORT),
        expect: passed(EXPORT),
    },
    // --- Method-name case. HTTP methods are case-sensitive tokens (RFC 9110 §9.1): `put` is
    // not `PUT` to hyper, but Django and Werkzeug/Flask upper-case `REQUEST_METHOD` and would
    // run their PUT handler. So the gate also matches a method as its upper-case form: an
    // extension method that spells a protected one is held like it.
    Row {
        name: "lower-case put is matched as PUT and held",
        attack: json("put", KEY, WITHDRAW),
        expect: Held,
    },
    Row {
        name: "mixed-case Put is matched as PUT and held",
        attack: json("Put", KEY, WITHDRAW),
        expect: Held,
    },
    Row {
        name: "lower-case get on the export is matched as GET and held",
        attack: bare("get", EXPORT),
        expect: Held,
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_attacks() {
    let gate = Gate::start().await;
    run_table(&gate, "methods", ROWS).await;
}
