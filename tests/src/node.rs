//! Node.js (Debian's `/usr/bin/node`, OpenSSL compiled in, `SSL_*` symbols
//! exported by the executable): an `https.createServer` and an `https.get`
//! client with a keep-alive agent, as small scripts of their own.
//!
//! Routes: `/status/404` -> 404, `/status/500` -> 500, anything else -> 200;
//! body `node says CODE\n`.

use crate::proc::{Proc, StopWith, TempDir, run_capture};
use crate::tls::TlsVersion;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub const NODE: &str = "/usr/bin/node";

fn node() -> Result<&'static str> {
    if !Path::new(NODE).is_file() {
        bail!("{NODE} is missing: install nodejs");
    }
    Ok(NODE)
}

const SERVER_JS: &str = r#"
const https = require('https'), fs = require('fs');
const cert = fs.readFileSync(process.argv[2]), key = fs.readFileSync(process.argv[3]);
const srv = https.createServer({cert, key}, (req, res) => {
  const code = req.url === '/status/404' ? 404 : req.url === '/status/500' ? 500 : 200;
  res.writeHead(code, {'content-type': 'text/plain'});
  res.end('node says ' + code + '\n');
});
srv.keepAliveTimeout = 30000;
srv.listen(0, '127.0.0.1', () => console.log('listening ' + srv.address().port));
process.on('SIGTERM', () => process.exit(0));
"#;

const CLIENT_JS: &str = r#"
const https = require('https');
const port = +process.argv[2], paths = process.argv.slice(3);
// One socket, kept alive: every request after the first reuses it.
const agent = new https.Agent({keepAlive: true, maxSockets: 1});
function get(i) {
  if (i >= paths.length) { agent.destroy(); return; }
  const req = https.get({host: '127.0.0.1', port, path: paths[i], agent, rejectUnauthorized: false}, res => {
    const s = res.socket;
    const line = `result ${res.statusCode} ${s.localPort} ${req.reusedSocket ? 1 : 0} ${s.getProtocol()} ${paths[i]}`;
    res.resume();
    res.on('end', () => { console.log(line); setImmediate(() => get(i + 1)); });
  });
  req.on('error', e => { console.error(e); process.exit(1); });
}
get(0);
"#;

/// `node server.js CERT KEY`: an HTTPS server on 127.0.0.1, free port.
pub struct NodeHttpsServer {
    proc: Proc,
    port: u16,
    _dir: TempDir,
}

impl NodeHttpsServer {
    pub fn start(cert: &Path, key: &Path) -> Result<NodeHttpsServer> {
        let node = node()?;
        let dir = TempDir::new("node-server")?;
        let script = dir.join("server.js");
        std::fs::write(&script, SERVER_JS)?;
        let mut cmd = Command::new(node);
        cmd.arg(&script).arg(cert).arg(key);
        let mut proc = Proc::spawn_with(
            "node-https-server",
            &mut cmd,
            StopWith {
                signal: libc::SIGTERM,
                grace: Duration::from_secs(3),
            },
        )?;
        let line = proc.wait_for_line("`listening PORT`", Duration::from_secs(20), |l| {
            l.starts_with("listening ")
        })?;
        let port = line["listening ".len()..]
            .trim()
            .parse()
            .with_context(|| format!("node printed {line:?}"))?;
        Ok(NodeHttpsServer {
            proc,
            port,
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

#[derive(Clone, Debug)]
pub struct NodeTransfer {
    pub path: String,
    pub status: u16,
    pub local_port: u16,
    pub reused: bool,
    pub version: Option<TlsVersion>,
}

#[derive(Clone, Debug)]
pub struct NodeRun {
    pub pid: u32,
    pub transfers: Vec<NodeTransfer>,
}

/// `node client.js PORT PATHS...`: `https.get` each path in order on one
/// kept-alive connection (`rejectUnauthorized: false`).
pub fn node_https_get(port: u16, paths: &[&str]) -> Result<NodeRun> {
    let node = node()?;
    let dir = TempDir::new("node-client")?;
    let script = dir.join("client.js");
    std::fs::write(&script, CLIENT_JS)?;
    let mut cmd = Command::new(node);
    cmd.arg(&script).arg(port.to_string()).args(paths);
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NODE_OPTIONS",
    ] {
        cmd.env_remove(v);
    }
    let f = run_capture("node-https-client", &mut cmd, Duration::from_secs(30))?.ok()?;
    let mut transfers = Vec::new();
    for l in f.stdout.lines() {
        let Some(rest) = l.strip_prefix("result ") else {
            continue;
        };
        let p: Vec<&str> = rest.splitn(5, ' ').collect();
        if p.len() != 5 {
            bail!("unexpected node output line {l:?}");
        }
        transfers.push(NodeTransfer {
            status: p[0].parse()?,
            local_port: p[1].parse()?,
            reused: p[2] == "1",
            version: TlsVersion::from_openssl_name(p[3]),
            path: p[4].to_string(),
        });
    }
    if transfers.len() != paths.len() {
        bail!(
            "node reported {} results for {} paths:\n{}\n{}",
            transfers.len(),
            paths.len(),
            f.stdout,
            f.stderr
        );
    }
    Ok(NodeRun {
        pid: f.pid,
        transfers,
    })
}
