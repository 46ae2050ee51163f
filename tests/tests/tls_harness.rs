//! Tests of the TLS harness itself, with real programs but without the agent:
//! the test certificate, nginx over HTTPS (TLS 1.3 and 1.2) answering curl
//! and Python, `s_server`/`s_client`, `gnutls-serv` in a network namespace,
//! Node's https server and keep-alive client, and the pip-grpcio TLS script.

use periscope_tests::certs::TestCert;
use periscope_tests::clients::curl;
use periscope_tests::node::{NodeHttpsServer, node_https_get};
use periscope_tests::proc::{TempDir, pid_alive};
use periscope_tests::tls::{
    GnutlsServer, NetNs, OpensslServer, TlsVersion, churn_ssl_processes, curl_in_netns,
    curl_negotiated, gnutls_cli_get, grpcio_tls, openssl_exchange, python_https_get,
};
use periscope_tests::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn nginx_https_answers_curl_and_python_with_the_configured_version() {
    run_test(LIMIT, || {
        let cert = TestCert::generate()?;
        for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
            let nginx = Nginx::start_with(NginxOptions {
                tls: Some(NginxTls::only(cert.cert(), cert.key(), version)),
                ..Default::default()
            })?;
            assert_eq!(nginx.scheme(), "https");
            let urls: Vec<String> = ["/", "/status/404", "/status/500"]
                .iter()
                .map(|p| nginx.url(p))
                .collect();
            let mut extra = vec!["-k", "-v"];
            extra.extend(version.curl_args());
            let run = curl(&urls, &extra)?;
            let codes: Vec<u16> = run.transfers.iter().map(|t| t.http_code).collect();
            assert_eq!(codes, [200, 404, 500], "{}", run.stderr);
            let connects: Vec<u32> = run.transfers.iter().map(|t| t.num_connects).collect();
            assert_eq!(connects, [1, 0, 0], "curl must reuse its TLS connection");
            assert_eq!(
                curl_negotiated(&run.stderr),
                Some(version),
                "{}",
                run.stderr
            );

            let py = python_https_get(&urls[..2], None)?;
            let got: Vec<(u16, Option<TlsVersion>)> =
                py.transfers.iter().map(|t| (t.status, t.version)).collect();
            assert_eq!(got, [(200, Some(version)), (404, Some(version))]);
            assert_ne!(py.transfers[0].local_port, py.transfers[1].local_port);

            let log = nginx.wait_for_tls_log(5, Duration::from_secs(10))?;
            assert!(log.iter().all(|l| l.version() == Some(version)), "{log:#?}");
            // curl's three requests share one connection.
            let curl_conn: Vec<(u64, u64)> = log[..3]
                .iter()
                .map(|l| (l.connection, l.connection_requests))
                .collect();
            assert_eq!(
                curl_conn,
                [
                    (curl_conn[0].0, 1),
                    (curl_conn[0].0, 2),
                    (curl_conn[0].0, 3)
                ]
            );
            assert_eq!(nginx.access_log()?.len(), 5);
            // A client capped below what the server accepts is refused.
            if version == TlsVersion::Tls13 {
                let refused = curl(&[nginx.url("/")], &["-k", "--tls-max", "1.2"]);
                assert!(
                    refused.is_err(),
                    "TLS 1.2 client got through a TLS 1.3-only nginx"
                );
            }
        }
        // Plain HTTP is unchanged.
        let plain = Nginx::start()?;
        assert_eq!(plain.scheme(), "http");
        assert!(plain.url("/").starts_with("http://127.0.0.1:"));
        assert_eq!(curl(&[plain.url("/")], &[])?.transfers[0].http_code, 200);
        Ok(())
    });
}

#[test]
fn openssl_s_server_and_s_client_exchange_one_request() {
    run_test(LIMIT, || {
        let cert = TestCert::generate()?;
        let dir = TempDir::new("s_client")?;
        let mut server = OpensslServer::start(cert.cert(), cert.key())?;
        let (pid, out) = openssl_exchange(&mut server, dir.path())?;
        assert!(pid > 0);
        assert!(out.contains("hello from openssl s_server"), "{out}");
        assert!(server.log().contains("GET / HTTP/1.0"), "{}", server.log());
        // On stdin's EOF it closes the connection and exits.
        server.proc().wait_exit(Duration::from_secs(10))?;
        Ok(())
    });
}

#[test]
fn gnutls_serv_in_a_network_namespace() {
    run_test(LIMIT, || {
        let cert = TestCert::generate()?;
        let ns = NetNs::new()?;
        let mut server = GnutlsServer::start(&ns, cert.cert(), cert.key())?;
        // It listens inside the namespace only.
        assert!(!periscope_tests::proc::wait_for_port(
            server.port(),
            Duration::from_millis(300)
        ));
        let f = gnutls_cli_get(&ns, server.port(), "/")?;
        assert!(f.stdout.contains("GnuTLS"), "{}", f.stdout);
        let (curl_pid, code) =
            curl_in_netns(&ns, &format!("https://127.0.0.1:{}/", server.port()))?;
        assert_eq!(code, 200);
        assert!(curl_pid > 0 && curl_pid != f.pid);
        assert!(server.proc().is_running(), "{}", server.log());
        // `ip netns exec` execs: the spawned pid is gnutls-serv itself.
        let exe = std::fs::read_link(format!("/proc/{}/exe", server.pid()))?;
        assert_eq!(exe, std::path::Path::new("/usr/bin/gnutls-serv"));
        Ok(())
    });
}

#[test]
fn node_https_server_and_keep_alive_client() {
    run_test(LIMIT, || {
        let cert = TestCert::generate()?;
        let server = NodeHttpsServer::start(cert.cert(), cert.key())?;
        let run = node_https_get(server.port(), &["/", "/status/404", "/status/500"])?;
        let got: Vec<(u16, bool)> = run.transfers.iter().map(|t| (t.status, t.reused)).collect();
        assert_eq!(got, [(200, false), (404, true), (500, true)]);
        let ports: Vec<u16> = run.transfers.iter().map(|t| t.local_port).collect();
        assert!(
            ports.iter().all(|p| *p == ports[0]),
            "one connection: {ports:?}"
        );
        assert!(
            run.transfers
                .iter()
                .all(|t| t.version == Some(TlsVersion::Tls13))
        );
        let exe = std::fs::read_link(format!("/proc/{}/exe", server.pid()))?;
        assert_eq!(exe, std::path::Path::new("/usr/bin/node"));
        Ok(())
    });
}

#[test]
fn grpcio_tls_script_runs_with_and_without_system_libssl() {
    run_test(LIMIT, || {
        let cert = TestCert::generate()?;
        let as_is = grpcio_tls(cert.cert(), cert.key(), false, 3)?;
        assert_eq!(as_is.replies, ["pong:hi0", "pong:hi1", "pong:hi2"]);
        // grpc -> asyncio -> ssl: libssl is mapped though gRPC never uses it.
        assert!(as_is.libssl_mapped, "{as_is:?}");
        assert!(
            !as_is.exe.starts_with("/usr/bin"),
            "pip's python, not Debian's: {as_is:?}"
        );
        let hidden = grpcio_tls(cert.cert(), cert.key(), true, 2)?;
        assert_eq!(hidden.replies.len(), 2);
        assert!(!hidden.libssl_mapped, "{hidden:?}");
        assert_eq!(hidden.exe, as_is.exe);
        Ok(())
    });
}

#[test]
fn ssl_process_churn_leaves_nothing_behind() {
    run_test(LIMIT, || {
        let pids = churn_ssl_processes(40, 4, Duration::from_millis(80))?;
        assert_eq!(pids.len(), 40);
        std::thread::sleep(Duration::from_millis(200));
        let alive: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
        assert!(alive.is_empty(), "still running: {alive:?}");
        Ok(())
    });
}
