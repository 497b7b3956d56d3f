//! A `kiln serve` process on a loopback port of its own, over a project made from the tiny SD1
//! fixture, and a small HTTP client for it. The process is killed when dropped.
#![allow(clippy::unwrap_used, dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipelines/sd1/model")
}

/// A project whose draft tier is the tiny model at 64², 2 steps, and whose final tier is the
/// same model at 128×96 with `final_steps` steps (slow enough to be caught mid-run).
pub fn project(final_steps: usize, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model().canonicalize().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "{extra}
[tiers.draft]
model = \"{m}\"
width = 64
height = 64
steps = 2
guidance = 0.0
price = {{ credits_per_image = 0.01 }}
[tiers.final]
model = \"{m}\"
width = 128
height = 96
steps = {final_steps}
scheduler = \"euler\"
price = {{ credits_per_image = 0.05 }}
",
            m = model.display()
        ),
    )
    .unwrap();
    dir
}

pub fn kiln(project: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("KILN_PROJECT", project)
        .env("KILN_DATA_DIR", project.join(".data"))
        .env("XDG_CONFIG_HOME", project.join("no-user-config"))
        .env_remove("KILN_LOG")
        // Tests choose their database themselves (the scale-out test sets it).
        .env_remove("KILN_DATABASE_URL");
    c
}

/// The pixels `kiln generate --tier draft --prompt PROMPT --seed SEED` writes (plus `extra`).
pub fn generate_pixels(project: &Path, prompt: &str, seed: u64, extra: &[&str]) -> Vec<u8> {
    let out = project.join(format!("cli-{seed}.png"));
    let o = kiln(project)
        .args(["generate", "--tier", "draft", "--prompt", prompt, "--device", "cpu", "-q"])
        .args(["--seed", &seed.to_string()])
        .args(extra)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    file_pixels(&out)
}

pub struct Server {
    pub child: Child,
    pub base: String,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(project: &Path, extra: &[&str]) -> Server {
        Self::start_with(kiln(project), extra)
    }

    /// [`Server::start`] from a prepared `kiln` command (extra environment).
    pub fn start_with(mut command: Command, extra: &[&str]) -> Server {
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--device", "cpu"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("kiln serve: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("kiln serve did not start: {}", log.lock().unwrap()));
        Server { child, base, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into()
    }

    /// One request; (status, headers' Retry-After, body).
    pub fn call(&self, method: &str, path: &str, auth: Option<&str>, body: Option<(&str, Vec<u8>)>) -> Resp {
        let url = format!("{}{path}", self.base);
        let agent = Self::agent();
        let auth_value =
            auth.map(|a| if a.starts_with("Basic ") { a.to_string() } else { format!("Bearer {a}") });
        let result = match (method, body) {
            ("GET", _) => {
                let mut r = agent.get(&url);
                if let Some(a) = &auth_value {
                    r = r.header("authorization", a);
                }
                r.call()
            }
            ("DELETE", _) => {
                let mut r = agent.delete(&url);
                if let Some(a) = &auth_value {
                    r = r.header("authorization", a);
                }
                r.call()
            }
            (_, body) => {
                let mut r = agent.post(&url);
                if let Some(a) = &auth_value {
                    r = r.header("authorization", a);
                }
                match body {
                    Some((ct, bytes)) => r.header("content-type", ct).send(&bytes[..]),
                    None => r.send_empty(),
                }
            }
        };
        let mut resp = result.unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()));
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut bytes = Vec::new();
        resp.body_mut().as_reader().read_to_end(&mut bytes).unwrap();
        Resp { status, retry_after, bytes }
    }

    /// Announces a `len`-byte JSON body and sends none of it: a limit that looks at the
    /// declared length answers before reading (the status line is returned).
    pub fn post_declared(&self, path: &str, len: usize) -> String {
        use std::io::Write;
        let addr = self.base.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
        .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        line
    }

    /// A raw GET with extra header lines; the whole response, headers included.
    pub fn raw_get(&self, path: &str, headers: &str) -> String {
        use std::io::Write;
        let addr = self.base.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out
    }

    pub fn get(&self, path: &str, auth: Option<&str>) -> Resp {
        self.call("GET", path, auth, None)
    }

    pub fn post_json(&self, path: &str, auth: Option<&str>, body: &Value) -> Resp {
        self.call("POST", path, auth, Some(("application/json", body.to_string().into_bytes())))
    }

    /// The job's SSE events until it ends, parsed.
    pub fn events(&self, id: i64, auth: Option<&str>) -> Vec<Value> {
        let r = self.get(&format!("/v1/jobs/{id}/events"), auth);
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    /// Polls a job until its state is final.
    pub fn wait(&self, id: i64, auth: Option<&str>) -> Value {
        let t0 = Instant::now();
        loop {
            let job = self.get(&format!("/v1/jobs/{id}"), auth).json();
            if matches!(job["state"].as_str(), Some("done" | "failed" | "cancelled")) {
                return job;
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "job {id} never ended: {job}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until job `id` has reported at least one denoising step.
    pub fn wait_running_step(&self, id: i64, auth: Option<&str>) {
        let t0 = Instant::now();
        loop {
            let job = self.get(&format!("/v1/jobs/{id}"), auth).json();
            if job["state"] == "running" {
                // A step has passed once /progress shows it for this job.
                let p = self.get("/sdapi/v1/progress", auth).json();
                if p["state"]["job"].as_str().and_then(|s| s.parse::<i64>().ok()) == Some(id)
                    && p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 1
                {
                    return;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "job {id} never ran a step: {job}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill9(&mut self) {
        unsafe_kill(self.child.id() as i32, 9);
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id() as i32, 15);
        self.child.wait().unwrap()
    }
}

/// SIGTERM to a child process, then its exit status.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    unsafe_kill(child.id() as i32, 15);
    child.wait().unwrap()
}

#[allow(unsafe_code)]
fn unsafe_kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid, sig);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Resp {
    pub status: u16,
    pub retry_after: Option<String>,
    pub bytes: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The Python of .venv-clients (the real clients and Playwright the server tests drive), made
/// by scripts/client-venv.sh when it is missing or lacks a module.
pub fn client_python() -> PathBuf {
    let repo = repo();
    let py = repo.join(".venv-clients/bin/python");
    let ok = py.is_file()
        && Command::new(&py)
            .args(["-c", "import openai, requests, playwright"])
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        let s = Command::new(repo.join("scripts/client-venv.sh")).status().unwrap();
        assert!(
            s.success(),
            "scripts/client-venv.sh failed: the client tests need PyPI's openai, requests and playwright"
        );
    }
    py
}

/// Runs tests/clients/SCRIPT with `args`; its last stdout line, parsed as JSON.
pub fn run_client(script: &str, args: &[&str]) -> Value {
    let o = Command::new(client_python())
        .arg(repo().join("tests/clients").join(script))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// Decodes a base64 PNG to RGB pixels.
pub fn b64_pixels(s: &str) -> Vec<u8> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8().into_raw()
}

pub fn file_pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}
