//! The studio page: `/` and its files under `/ui/`, compiled into the binary from
//! `crates/kiln-server/web/` (plain ES modules and CSS; no build step, nothing fetched from
//! elsewhere). The page is public (it holds no data); everything it shows comes from the API,
//! which asks for a key as usual.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

/// One embedded file: its name under `/ui/`, content type and bytes.
struct WebFile {
    name: &'static str,
    mime: &'static str,
    body: &'static [u8],
}

macro_rules! web_file {
    ($name:literal, $mime:expr) => {
        WebFile { name: $name, mime: $mime, body: include_bytes!(concat!("../web/", $name)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static FILES: &[WebFile] = &[
    web_file!("index.html", "text/html; charset=utf-8"),
    web_file!("style.css", "text/css; charset=utf-8"),
    web_file!("favicon.svg", "image/svg+xml"),
    web_file!("api.js", JS),
    web_file!("app.js", JS),
    web_file!("studio.js", JS),
    web_file!("editor.js", JS),
    web_file!("qc.js", JS),
    web_file!("queue.js", JS),
    web_file!("library.js", JS),
    web_file!("costs.js", JS),
    web_file!("frame.js", JS),
];

/// Paths served without an API key: the page and its files.
pub fn is_public(path: &str) -> bool {
    path == "/" || path.strip_prefix("/ui/").is_some_and(|name| FILES.iter().any(|f| f.name == name))
}

fn serve(file: &WebFile) -> Response {
    // The files change only with the binary; `no-cache` makes the browser revalidate, so an
    // upgraded server never runs against a stale script.
    ([(header::CONTENT_TYPE, file.mime), (header::CACHE_CONTROL, "no-cache")], file.body).into_response()
}

pub async fn index() -> Response {
    serve(&FILES[0])
}

pub async fn asset(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|f| f.name == name) {
        Some(f) => serve(f),
        None => crate::error::ApiError::NotFound(format!("no file `{name}` in the web UI")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_the_page_imports_is_embedded() {
        // A new `import ... from "./x.js"` without a line in FILES would 404 in the browser.
        for f in FILES.iter().filter(|f| f.name.ends_with(".js") || f.name.ends_with(".html")) {
            let text = std::str::from_utf8(f.body).unwrap_or_default();
            for part in text.split("\"./").skip(1).chain(text.split("\"/ui/").skip(1)) {
                let Some(name) = part.split('"').next() else { continue };
                assert!(
                    FILES.iter().any(|g| g.name == name),
                    "{} refers to {name}, which is not embedded",
                    f.name
                );
            }
        }
        assert!(is_public("/") && is_public("/ui/app.js"));
        assert!(!is_public("/ui/../v1/jobs") && !is_public("/v1/jobs") && !is_public("/ui/nope.js"));
    }
}
