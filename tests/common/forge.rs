//! A stand-in forge API on loopback: a real HTTP/1.1 server that records every request
//! exactly as it arrived (method, path, headers, JSON body) and answers with the status
//! codes it is told, in order (then 201); a GET of a path it was given a listing for
//! (open pull requests) gets that JSON. Forges are third-party APIs: this is the one
//! place a stand-in is right.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lowercased.
    pub headers: BTreeMap<String, String>,
    pub body: serde_json::Value,
}

pub struct FakeForge {
    pub url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    answers: Arc<Mutex<VecDeque<u16>>>,
    listings: Arc<Mutex<BTreeMap<String, serde_json::Value>>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeForge {
    pub async fn start() -> FakeForge {
        FakeForge::start_on(std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// Listening on `ip` (a free port), for clients on another network (pods).
    pub async fn start_on(ip: std::net::IpAddr) -> FakeForge {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(VecDeque::new()));
        let listings = Arc::new(Mutex::new(BTreeMap::<String, serde_json::Value>::new()));
        let (reqs, ans, lists) = (requests.clone(), answers.clone(), listings.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (reqs, ans, lists) = (reqs.clone(), ans.clone(), lists.clone());
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    // Keep-alive: serve requests on this connection until it closes.
                    while let Some(request) = read_request(&mut stream).await {
                        let listing = (request.method == "GET")
                            .then(|| lists.lock().unwrap().get(&request.path).cloned())
                            .flatten();
                        reqs.lock().unwrap().push(request);
                        let (code, body) = match listing {
                            Some(json) => (200, json.to_string()),
                            None => {
                                let code = ans.lock().unwrap().pop_front().unwrap_or(201);
                                let body = if code < 300 {
                                    "{}"
                                } else {
                                    "{\"message\":\"nope\"}"
                                };
                                (code, body.to_string())
                            }
                        };
                        let response = format!(
                            "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream
                            .get_mut()
                            .write_all(response.as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        FakeForge {
            url,
            requests,
            answers,
            listings,
            server,
        }
    }

    /// The next requests get these status codes, in order.
    pub fn answer_with(&self, codes: &[u16]) {
        self.answers.lock().unwrap().extend(codes);
    }

    /// The flags that make `pgflip local` or `pgflip controller` report to this forge as
    /// GitHub, for the repository `shop/db`.
    pub fn github_args(&self) -> Vec<String> {
        [
            "--forge",
            "github",
            "--forge-api",
            &self.url,
            "--forge-repository",
            "shop/db",
        ]
        .map(String::from)
        .to_vec()
    }

    /// A GET of `path` (with its query) answers `json` from now on.
    pub fn list(&self, path: &str, json: serde_json::Value) {
        self.listings.lock().unwrap().insert(path.to_string(), json);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeForge {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn read_request(stream: &mut BufReader<tokio::net::TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if stream.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        stream.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let length: usize = headers
        .get("content-length")
        .map_or(Ok(0), |v| v.parse())
        .ok()?;
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    Some(Request {
        method,
        path,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    })
}
