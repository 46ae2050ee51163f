//! Tests of the harness itself, with real programs but without the agent:
//! Rotel receiving spans from the OpenTelemetry Python SDK, nginx serving curl
//! with its access log parsed, the other servers, and process clean-up.

use periscope_tests::clients::{curl, curl1, python_raw_send};
use periscope_tests::proc::{Proc, pid_alive, poll};
use periscope_tests::rotel::send_with_python_sdk;
use periscope_tests::*;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn rotel_receives_spans_from_the_python_sdk() {
    run_test(LIMIT, || {
        let rotel = Rotel::start()?;
        send_with_python_sdk(
            &rotel.endpoint(),
            &[
                ("service.name", "harness-check"),
                ("host.name", "box\nwith newline"),
            ],
            r#"
with tracer.start_as_current_span("GET", kind=SpanKind.SERVER, attributes={
        "http.request.method": "GET", "url.path": "/a b", "http.response.status_code": 500,
        "server.port": 8080, "multi": "line1\nline2)\n(x"}) as s:
    s.set_status(Status(StatusCode.ERROR, "boom"))
    with tracer.start_as_current_span("child", kind=SpanKind.CLIENT) as c:
        c.add_event("an event", {"k": "v"})
        c.set_attribute("after.event", 7)
for i in range(300):
    with tracer.start_as_current_span("bulk", kind=SpanKind.CLIENT, attributes={"i": i}):
        pass
"#,
        )?;
        let spans = rotel.wait_for_spans(
            |s| s.service_name() == Some("harness-check"),
            302,
            Duration::from_secs(20),
        );
        let find = |name: &str| {
            spans
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("{}", with_spans(format!("no span {name}"), &spans)))
        };
        let root = find("GET");
        let child = find("child");
        assert_eq!(root.kind, SpanKind::Server, "{root}");
        assert_eq!(root.parent_span_id, None, "{root}");
        assert_eq!(root.status.code, StatusCode::Error, "{root}");
        assert_eq!(root.status.message, "boom");
        assert_eq!(root.path(), Some("/a b"));
        assert_eq!(root.status_code(), Some(500));
        assert_eq!(root.int_attr("server.port"), Some(8080));
        // A value with newlines and parentheses stays one value.
        assert_eq!(root.str_attr("multi"), Some("line1\nline2)\n(x"), "{root}");
        assert_eq!(root.res_str("host.name"), Some("box\nwith newline"));
        assert_eq!(root.trace_id.len(), 32);
        assert_eq!(root.span_id.len(), 16);
        assert!(
            root.end_ns > root.start_ns && root.start_ns > 1_600_000_000_000_000_000,
            "{root}"
        );
        assert_eq!(child.kind, SpanKind::Client);
        assert_eq!(child.trace_id, root.trace_id);
        assert_eq!(child.parent_span_id.as_deref(), Some(root.span_id.as_str()));
        assert_eq!(
            child.int_attr("after.event"),
            Some(7),
            "events must not swallow attributes: {child}"
        );
        assert!(
            !child.attributes.contains_key("k"),
            "event attributes are not span attributes: {child}"
        );
        let mut bulk: Vec<i64> = spans
            .iter()
            .filter(|s| s.name == "bulk")
            .filter_map(|s| s.int_attr("i"))
            .collect();
        bulk.sort_unstable();
        assert_eq!(bulk, (0..300).collect::<Vec<_>>());
        assert_eq!(rotel.spans().len(), 302, "no extra or duplicated spans");
        Ok(())
    });
}

#[test]
fn nginx_serves_curl_and_its_access_log_parses() {
    run_test(LIMIT, || {
        let nginx = Nginx::start_with(NginxOptions {
            extra_locations: "location /extra/ { return 201 \"extra\\n\"; }".into(),
            ..Default::default()
        })?;
        let worker = nginx.worker_pid()?;
        let cases = [
            ("/", 200u16, nginx::INDEX_HTML.len() as u64),
            ("/big.bin", 200, nginx::BIG_SIZE as u64),
            ("/status/404", 404, 0),
            ("/status/500", 500, 5),
            ("/chunked", 200, 0),
            ("/extra/x", 201, 6),
            (
                "/index.html?secret=xyz",
                200,
                nginx::INDEX_HTML.len() as u64,
            ),
        ];
        for (path, status, size) in cases {
            let (_pid, t) = curl1(&nginx.url(path), &[])?;
            assert_eq!(t.http_code, status, "{path}: {t:?}");
            if size > 0 {
                assert_eq!(t.size_download, size, "{path}: {t:?}");
            }
            assert!(
                t.time_total >= t.time_connect && t.time_connect > 0.0,
                "{t:?}"
            );
        }
        // /chunked really is chunked, /big.bin is not.
        let headers = |path: &str| -> anyhow::Result<String> {
            let f = periscope_tests::proc::run_capture(
                "curl",
                Command::new("curl").args([
                    "-sS",
                    "--http1.1",
                    "-D",
                    "-",
                    "-o",
                    "/dev/null",
                    &nginx.url(path),
                ]),
                Duration::from_secs(10),
            )?
            .ok()?;
            Ok(f.stdout.to_ascii_lowercase())
        };
        let h = headers("/chunked")?;
        assert!(
            h.contains("transfer-encoding: chunked") && !h.contains("content-length"),
            "{h}"
        );
        let h = headers("/big.bin")?;
        assert!(
            h.contains("content-length: 102400") && !h.contains("transfer-encoding"),
            "{h}"
        );

        let log = nginx.wait_for_access_log(cases.len() + 2, Duration::from_secs(5))?;
        for ((path, status, _), e) in cases.iter().zip(&log) {
            assert_eq!(e.request_uri, *path, "{e:?}");
            assert_eq!(e.path(), path.split('?').next().unwrap());
            assert_eq!(e.status, *status, "{e:?}");
            assert_eq!(e.method, "GET");
            assert_eq!(e.protocol, "HTTP/1.1");
            assert_eq!(e.pid, worker, "served by the worker");
            assert_eq!(e.remote_addr, "127.0.0.1");
            assert!(e.request_time >= 0.0 && e.request_time < 5.0, "{e:?}");
            assert!(e.bytes_sent > 0 && e.request_length > 0, "{e:?}");
        }

        // One curl, several URLs: one connection, reused (test 2 relies on it).
        let urls: Vec<String> = ["/", "/big.bin", "/status/404"]
            .iter()
            .map(|p| nginx.url(p))
            .collect();
        let run = curl(&urls, &[])?;
        let connects: Vec<u32> = run.transfers.iter().map(|t| t.num_connects).collect();
        assert_eq!(connects, vec![1, 0, 0], "{run:?}");
        let log = nginx.wait_for_access_log(cases.len() + 5, Duration::from_secs(5))?;
        let tail = &log[log.len() - 3..];
        assert!(
            tail.iter().all(|e| e.connection == tail[0].connection),
            "{tail:#?}"
        );
        assert_eq!(
            tail.iter()
                .map(|e| e.connection_requests)
                .collect::<Vec<_>>(),
            vec![1, 2, 3]
        );

        // Pipelined requests in one write from Python (test 2 relies on it).
        let reqs = "GET /index.html HTTP/1.1\r\nHost: a\r\n\r\nGET /status/404 HTTP/1.1\r\nHost: a\r\n\r\nGET /big.bin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        let (_pid, port, received) = python_raw_send(nginx.port(), reqs.as_bytes(), false)?;
        assert!(received > nginx::BIG_SIZE, "received {received}");
        let log = nginx.wait_for_access_log(cases.len() + 8, Duration::from_secs(5))?;
        let tail = &log[log.len() - 3..];
        assert!(port > 0);
        assert_eq!(
            tail.iter().map(|e| e.path()).collect::<Vec<_>>(),
            vec!["/index.html", "/status/404", "/big.bin"]
        );
        assert!(
            tail.iter().all(|e| e.connection == tail[0].connection),
            "{tail:#?}"
        );

        // Stopping reaps master and worker.
        let master = nginx.master_pid();
        drop(nginx);
        assert!(
            !pid_alive(master) && !pid_alive(worker),
            "nginx {master}/{worker} still alive after drop"
        );
        Ok(())
    });
}

#[test]
fn python_http_server_and_redis_answer() {
    run_test(LIMIT, || {
        let py = PyHttpServer::start()?;
        let (_, t) = curl1(&py.url("/hello.txt"), &[])?;
        assert_eq!(t.http_code, 200);
        let (_, t) = curl1(&py.url("/missing"), &[])?;
        assert_eq!(t.http_code, 404);
        assert_eq!(system_python_exe_name(), "python3.11");

        let redis = Redis::start()?;
        assert_eq!(redis.cli(&["PING"])?, "PONG");
        assert_eq!(redis.cli(&["SET", "k", "v"])?, "OK");
        assert_eq!(redis.cli(&["GET", "k"])?, "v");
        Ok(())
    });
}

#[test]
fn children_are_stopped_on_panic_and_on_timeout() {
    // A panicking test body still stops what it started.
    let pid = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let p2 = pid.clone();
    let r = std::panic::catch_unwind(move || {
        run_test(LIMIT, move || {
            let p = Proc::spawn("sleep", Command::new("sleep").arg("1000"))?;
            p2.store(p.pid(), std::sync::atomic::Ordering::SeqCst);
            panic!("deliberate");
        })
    });
    assert!(r.is_err());
    let pid = pid.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        pid != 0 && !pid_alive(pid),
        "sleep {pid} survived a panicking test"
    );

    // A test body that hangs is killed with what it started.
    let pid = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let p2 = pid.clone();
    let r = std::panic::catch_unwind(move || {
        run_test(Duration::from_secs(2), move || {
            let mut p = Proc::spawn("sleep", Command::new("sleep").arg("1000"))?;
            p2.store(p.pid(), std::sync::atomic::Ordering::SeqCst);
            p.wait_exit(Duration::from_secs(60))?;
            Ok(())
        })
    });
    assert!(r.is_err(), "timeout must fail the test");
    let pid = pid.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        poll(Duration::from_secs(5), Duration::from_millis(20), || {
            (!pid_alive(pid)).then_some(())
        })
        .is_some(),
        "sleep {pid} survived a timed-out test"
    );

    // A process that ignores SIGTERM is killed after the grace period.
    let mut p = Proc::spawn_with(
        "stubborn",
        Command::new("sh").args(["-c", "trap '' TERM; echo started; sleep 1000"]),
        periscope_tests::proc::StopWith {
            signal: libc::SIGTERM,
            grace: Duration::from_millis(300),
        },
    )
    .unwrap();
    p.wait_for_line("started", Duration::from_secs(5), |l| l == "started")
        .unwrap();
    let shell = p.pid();
    let st = p.stop().expect("reaped");
    assert!(!st.success());
    assert!(!pid_alive(shell));
}
