#!/usr/bin/env python3
"""Checks docs/deploy/envoy.yaml without Envoy (not installable here): that it says what the
deployment README promises. TLS on the listener; /api/v1/api-keys and /_stepgate/ to the
stepgate cluster with the session check on; the cancel link without it; everything else to the
exchange with the session check off and any client `x-verified-user` removed; the session
check's `x-verified-user` copied onto requests (overwriting a client's copy); client request ids
kept; underscore headers and encoded slashes refused; clusters pointing where they should.

usage: check_envoy.py docs/deploy/envoy.yaml
Exits non-zero, naming each broken promise, when one does not hold.
"""

import sys

import yaml

AUTHZ = "envoy.filters.http.ext_authz"
failures = []
checked = []


def check(condition, promise):
    checked.append(promise)
    if not condition:
        failures.append(promise)


def authz_disabled(route):
    per_filter = route.get("typed_per_filter_config", {})
    return per_filter.get(AUTHZ, {}).get("disabled") is True


def main(path):
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    resources = config["static_resources"]
    (listener,) = resources["listeners"]
    check(listener["address"]["socket_address"]["port_value"] == 443, "listens on 443")
    (chain,) = listener["filter_chains"]
    tls = chain.get("transport_socket", {})
    check(tls.get("name") == "envoy.transport_sockets.tls", "TLS is terminated on the listener")
    certs = tls.get("typed_config", {}).get("common_tls_context", {}).get("tls_certificates", [])
    check(len(certs) == 1, "one certificate on the listener")

    (hcm_filter,) = chain["filters"]
    hcm = hcm_filter["typed_config"]
    check(hcm.get("use_remote_address") is True, "the TCP peer is the client (use_remote_address)")
    check(hcm.get("preserve_external_request_id") is True, "a client's x-request-id is kept")
    check(hcm.get("normalize_path") is True and hcm.get("merge_slashes") is True,
          "routes match on a normalised path")
    check(hcm.get("path_with_escaped_slashes_action") == "REJECT_REQUEST", "encoded slashes refused")
    check(hcm.get("common_http_protocol_options", {}).get("headers_with_underscores_action")
          == "REJECT_REQUEST", "underscore headers refused")

    filters = [f["name"] for f in hcm["http_filters"]]
    check(filters == [AUTHZ, "envoy.filters.http.router"], "ext_authz runs before the router")
    authz = hcm["http_filters"][0]["typed_config"]
    check(authz.get("failure_mode_allow") is False, "a failed session check refuses")
    service = authz["http_service"]
    check(service["server_uri"]["cluster"] == "exchange_session_check", "asks the session check")
    check(service.get("path_prefix") == "/internal/session", "the exchange's session check path")
    upstream = [p.get("exact") for p in
                service["authorization_response"]["allowed_upstream_headers"]["patterns"]]
    check(upstream == ["x-verified-user"], "the check's x-verified-user is copied onto requests")

    (vhost,) = hcm["route_config"]["virtual_hosts"]
    routes = vhost["routes"]

    def route_for(request_path):
        """The first route that matches, as Envoy picks it."""
        for route in routes:
            match = route["match"]
            if "path" in match and request_path == match["path"]:
                return route
            if "prefix" in match and request_path.startswith(match["prefix"]):
                return route
        return None

    gated = ["/api/v1/api-keys", "/api/v1/api-keys/k1", "/_stepgate/changes",
             "/_stepgate/api/changes/x/confirm/start"]
    for request_path in gated:
        route = route_for(request_path)
        check(route is not None and route["route"]["cluster"] == "stepgate",
              f"{request_path} goes to stepgate")
        check(route is not None and not authz_disabled(route),
              f"{request_path} gets the session check (its identity)")
        check(route is not None and "x-verified-user" not in route.get("request_headers_to_remove", []),
              f"{request_path} keeps the identity the check set")
    cancel = route_for("/_stepgate/cancel/abc")
    check(cancel["route"]["cluster"] == "stepgate" and authz_disabled(cancel)
          and "x-verified-user" in cancel.get("request_headers_to_remove", []),
          "the cancel link goes to stepgate without a session and without identity")
    for request_path in ["/api/v1/orders", "/api/v1/api-keysX", "/", "/api/v1/account"]:
        route = route_for(request_path)
        check(route is not None and route["route"]["cluster"] == "exchange",
              f"{request_path} goes straight to the exchange")
        check(route is not None and authz_disabled(route),
              f"{request_path} needs no session check at the edge")
        check(route is not None and "x-verified-user" in route.get("request_headers_to_remove", []),
              f"{request_path} loses a client-sent x-verified-user")

    clusters = {c["name"]: c for c in resources["clusters"]}

    def port(name):
        endpoint = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        return endpoint["endpoint"]["address"]["socket_address"]["port_value"]

    check(set(clusters) == {"stepgate", "exchange", "exchange_session_check"}, "three clusters")
    check(port("stepgate") == 8080, "stepgate on 8080, as stepgate.toml's listen")
    check(port("exchange") == 9000 and port("exchange_session_check") == 9000,
          "the exchange on 9000, as stepgate.toml's upstream")

    if failures:
        for failure in failures:
            print(f"envoy.yaml: broken promise: {failure}", file=sys.stderr)
        sys.exit(1)
    print(f"envoy.yaml: all {len(checked)} structural checks hold")


if __name__ == "__main__":
    main(sys.argv[1])
