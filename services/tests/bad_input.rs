//! Bad input on every endpoint (issue #4, "Bad input"): malformed JSON, bodies that are not
//! objects, unknown, duplicated, missing and wrongly typed fields, oversize bodies, invalid path
//! ids, out-of-range values and unknown references are each answered with a 4xx
//! `application/problem+json` and write nothing: the event store's head is compared after every
//! request. Driven through the router with `tower::ServiceExt::oneshot` over a real temporary
//! SQLite store.
//!
//! Also property tests at a small size: the command body decoder (`ApiJson` with each body type)
//! on arbitrary JSON values, near-valid bodies and arbitrary bytes never panics and either
//! accepts an object with only known fields or answers a 4xx problem.
//!
//! Every request carries both identities the API has known: `X-User-Id: <uuid>` and
//! `Authorization: Bearer <JWT>` (HS256, signed with [`test_jwt_secret`]); the application under
//! test is configured in [`open_app`]. Requests whose answer does not depend on the caller come
//! from a new caller each, so that per-user rate limits never decide an answer.

use std::path::Path;

use axum::body::Body;
use axum::extract::FromRequest;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use tektree_domain::Rules;
use tektree_event_store::Head;
use tektree_services::api::auth::{AuthConfig, Authenticator, JwtKey};
use tektree_services::api::commands::{
    AcceptBody, AnswerBody, CommentBody, QuestionBody, RegisterBody, VoteBody,
};
use tektree_services::api::extract::ApiJson;
use tektree_services::api::problem::{ProblemBody, PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_BASE};
use tektree_services::api::security::Security;
use tektree_services::api::ApiState;
use tektree_services::api::{self, BODY_LIMIT};
use tektree_services::app::App;
use tower::ServiceExt;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Identity and the application under test.

/// The HS256 secret the test tokens are signed with. The application under test must accept
/// tokens signed with it (see [`open_app`]).
fn test_jwt_secret() -> &'static [u8] {
    b"tektree-bad-input-test-secret-0123456789abcdef"
}

/// Issuer and audience of the test tokens.
const JWT_ISSUER: &str = "tektree";
const JWT_AUDIENCE: &str = "tektree-api";

#[derive(serde::Serialize)]
struct Claims {
    sub: String,
    iss: &'static str,
    aud: &'static str,
    exp: i64,
    iat: i64,
}

/// A valid token for `user`: HS256, `sub` = the user, expiring in an hour.
fn jwt(user: Uuid) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = Claims {
        sub: user.to_string(),
        iss: JWT_ISSUER,
        aud: JWT_AUDIENCE,
        exp: now + 3600,
        iat: now,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(test_jwt_secret()),
    )
    .expect("sign the test token")
}

/// The identity headers of `user`: both `X-User-Id` and a bearer token.
fn identity(user: Uuid) -> Vec<(&'static str, String)> {
    vec![
        ("x-user-id", user.to_string()),
        ("authorization", format!("Bearer {}", jwt(user))),
    ]
}

/// The application under test on a fresh SQLite file in `dir` with the in-process bus and no
/// pipeline (so only commands write): tokens are verified with [`test_jwt_secret`] (default
/// issuer `tektree` and audience `tektree-api`), with the default rate limits and no CORS. The
/// one place to configure it.
async fn open_app(dir: &Path) -> ApiState {
    let url = format!("sqlite://{}", dir.join("tektree.db").display());
    let auth = Authenticator::new(AuthConfig::new(JwtKey::Hs256(test_jwt_secret().to_vec())))
        .expect("the test secret is long enough");
    let app = App::open(&url, "memory", Rules::default()).await.unwrap();
    ApiState::new(app).with_security(Security {
        auth,
        ..Security::ephemeral()
    })
}

// ---------------------------------------------------------------------------------------------
// Harness.

struct Harness {
    app: App,
    router: Router,
    _dir: tempfile::TempDir,
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    json: Value,
    text: String,
}

impl Harness {
    async fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let state = open_app(dir.path()).await;
        Harness {
            router: api::router(state.clone()),
            app: state.app.as_ref().clone(),
            _dir: dir,
        }
    }

    async fn head(&self) -> Head {
        self.app.store.head().await.unwrap()
    }

    async fn send(&self, r: &Req) -> Resp {
        let mut req = Request::builder().method(r.method.clone()).uri(&r.uri);
        if let Some(user) = r.caller {
            for (k, v) in identity(user) {
                req = req.header(k, v);
            }
        }
        if let Some(ct) = &r.content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let body = match &r.body {
            Payload::Bytes(b) => Body::from(b.clone()),
            Payload::Stream(b) => {
                // Chunked, without a Content-Length: the limit must hold while streaming.
                let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                    b.chunks(4096).map(|c| Ok(c.to_vec())).collect();
                Body::from_stream(futures::stream::iter(chunks))
            }
        };
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            json,
            text,
        }
    }

    /// Sends a valid command that must succeed; its JSON response.
    async fn ok(&self, uri: &str, caller: Uuid, body: Value) -> Value {
        let r = self.send(&Req::post(uri, Some(caller), &body)).await;
        assert!(r.status.is_success(), "{uri}: {} {}", r.status, r.text);
        r.json
    }

    /// Registers a new user named `name`.
    async fn register(&self, name: &str) -> Uuid {
        let id = Uuid::new_v4();
        self.ok("/v1/users", id, json!({ "display_name": name }))
            .await;
        id
    }

    /// Sends `case`, checks its problem response and that the store did not change.
    async fn check(&self, case: &Case, head: Head) {
        let r = self.send(&case.req).await;
        let label = format!("{} {} [{}]", case.req.method, case.req.uri, case.what);
        assert_problem(&r, case.status, case.code, &label);
        assert_eq!(self.head().await, head, "{label}: the store changed");
    }
}

/// Asserts a 4xx `application/problem+json` response, with `status` and type suffix `code`
/// when given.
fn assert_problem(r: &Resp, status: Option<StatusCode>, code: Option<&str>, label: &str) {
    assert!(
        r.status.is_client_error(),
        "{label}: expected 4xx, got {} {}",
        r.status,
        r.text
    );
    if let Some(s) = status {
        assert_eq!(r.status, s, "{label}: {}", r.text);
    }
    assert_eq!(
        r.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some(PROBLEM_CONTENT_TYPE),
        "{label}: {}",
        r.text
    );
    let body: ProblemBody = serde_json::from_value(r.json.clone())
        .unwrap_or_else(|e| panic!("{label}: not a problem body ({e}): {}", r.text));
    assert_eq!(body.status, r.status.as_u16(), "{label}");
    assert!(body.type_uri.starts_with(PROBLEM_TYPE_BASE), "{label}");
    assert!(!body.title.is_empty(), "{label}");
    if let Some(code) = code {
        assert_eq!(
            body.type_uri,
            format!("{PROBLEM_TYPE_BASE}{code}"),
            "{label}: {}",
            r.text
        );
    }
}

#[derive(Clone)]
enum Payload {
    Bytes(Vec<u8>),
    Stream(Vec<u8>),
}

#[derive(Clone)]
struct Req {
    method: Method,
    uri: String,
    caller: Option<Uuid>,
    content_type: Option<String>,
    body: Payload,
}

impl Req {
    fn post(uri: &str, caller: Option<Uuid>, body: &Value) -> Req {
        Req::post_raw(uri, caller, serde_json::to_vec(body).unwrap())
    }

    fn post_raw(uri: &str, caller: Option<Uuid>, body: Vec<u8>) -> Req {
        Req {
            method: Method::POST,
            uri: uri.to_string(),
            caller,
            content_type: Some("application/json".into()),
            body: Payload::Bytes(body),
        }
    }

    fn get(uri: &str) -> Req {
        Req {
            method: Method::GET,
            uri: uri.to_string(),
            caller: None,
            content_type: None,
            body: Payload::Bytes(vec![]),
        }
    }
}

/// One bad request and the answer it must get.
struct Case {
    what: String,
    req: Req,
    status: Option<StatusCode>,
    code: Option<&'static str>,
}

const BAD_REQUEST: StatusCode = StatusCode::BAD_REQUEST;
const UNPROCESSABLE: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;
const NOT_FOUND: StatusCode = StatusCode::NOT_FOUND;

fn case(what: impl Into<String>, req: Req, status: StatusCode, code: &'static str) -> Case {
    Case {
        what: what.into(),
        req,
        status: Some(status),
        code: Some(code),
    }
}

// ---------------------------------------------------------------------------------------------
// The endpoints.

/// One command endpoint: its URI, a valid body, its required fields, and a caller for whom
/// the valid body succeeds.
struct Command {
    name: &'static str,
    uri: String,
    /// `{id}` in the URI, replaced by bad ids; `None` for `/v1/users` and `/v1/questions`.
    path_id: Option<String>,
    valid: Value,
    /// The valid body's values as a JSON array, in the body type's field order (a form serde's
    /// derived structs accept unless told otherwise).
    array_form: Value,
    required: &'static [&'static str],
    /// Optional fields (ids that default to a new one).
    optional: &'static [&'static str],
    caller: Uuid,
}

/// What the test created before the bad requests.
struct World {
    ada: Uuid,
    bob: Uuid,
    /// Ada's question with Bob's answer `a`.
    q: Uuid,
    a: Uuid,
    /// Ada's second question with Bob's answer `a2`.
    q2: Uuid,
    a2: Uuid,
}

async fn world(h: &Harness) -> World {
    let ada = h.register("Ada").await;
    let bob = h.register("Bob").await;
    let mut ids = vec![];
    for title in ["Why Rome?", "Why Greece?"] {
        let q = h
            .ok(
                "/v1/questions",
                ada,
                json!({"title": title, "body": "", "tags": ["history"]}),
            )
            .await["aggregate_id"]
            .as_str()
            .unwrap()
            .parse::<Uuid>()
            .unwrap();
        let a = h
            .ok(
                &format!("/v1/questions/{q}/answers"),
                bob,
                json!({"body": "Because."}),
            )
            .await["aggregate_id"]
            .as_str()
            .unwrap()
            .parse::<Uuid>()
            .unwrap();
        ids.push((q, a));
    }
    World {
        ada,
        bob,
        q: ids[0].0,
        a: ids[0].1,
        q2: ids[1].0,
        a2: ids[1].1,
    }
}

fn commands(w: &World) -> Vec<Command> {
    let (q, a) = (w.q, w.a);
    vec![
        Command {
            name: "register",
            uri: "/v1/users".into(),
            path_id: None,
            valid: json!({"display_name": "Zed"}),
            array_form: json!([null, "Zed"]),
            required: &["display_name"],
            optional: &["user_id"],
            caller: Uuid::new_v4(),
        },
        Command {
            name: "post_question",
            uri: "/v1/questions".into(),
            path_id: None,
            valid: json!({"title": "T", "body": "B", "tags": ["history"]}),
            array_form: json!([null, "T", "B", ["history"]]),
            required: &["title", "body", "tags"],
            optional: &["question_id"],
            caller: w.ada,
        },
        Command {
            name: "submit_answer",
            uri: format!("/v1/questions/{q}/answers"),
            path_id: Some(q.to_string()),
            valid: json!({"body": "Another answer"}),
            array_form: json!([null, "Another answer"]),
            required: &["body"],
            optional: &["answer_id"],
            caller: w.bob,
        },
        Command {
            name: "accept_answer",
            uri: format!("/v1/questions/{q}/accept"),
            path_id: Some(q.to_string()),
            valid: json!({ "answer_id": a }),
            array_form: json!([a]),
            required: &["answer_id"],
            optional: &[],
            caller: w.ada,
        },
        Command {
            name: "add_comment",
            uri: format!("/v1/content/{q}/comments"),
            path_id: Some(q.to_string()),
            valid: json!({"text": "Nice"}),
            array_form: json!([null, "Nice"]),
            required: &["text"],
            optional: &["comment_id"],
            caller: w.bob,
        },
        Command {
            name: "vote",
            uri: format!("/v1/content/{q}/votes"),
            path_id: Some(q.to_string()),
            valid: json!({"direction": "up"}),
            array_form: json!(["up"]),
            required: &["direction"],
            optional: &[],
            caller: w.bob,
        },
    ]
}

/// Values of the wrong JSON type for `field` (none of them decodes into it; `null` only for a
/// `required` field).
fn wrong_types(field: &str, required: bool) -> Vec<Value> {
    let mut v = vec![json!(7), json!(true), json!({"x": 1}), json!([1])];
    if required {
        v.push(Value::Null);
    }
    match field {
        // Strings.
        "display_name" | "title" | "body" | "text" => {}
        // A list of strings.
        "tags" => {
            v.retain(|x| !x.is_array());
            v.extend([json!("history"), json!([1, 2]), json!([null])]);
        }
        // Ids: strings that are UUIDs.
        "user_id" | "question_id" | "answer_id" | "comment_id" => {
            v.extend([json!("not-a-uuid"), json!(""), json!("123")]);
        }
        // An enum of two strings.
        "direction" => v.extend([json!("sideways"), json!("UP"), json!(""), json!(1)]),
        other => panic!("no wrong types for {other}"),
    }
    v
}

/// Malformed JSON: none of these parses, and each is malformed before any field could be
/// refused (unknown fields are refused as soon as their name is read).
fn malformed_json(valid: &Value, first: &str) -> Vec<(&'static str, Vec<u8>)> {
    let text = valid.to_string();
    let mut invalid_utf8 = text.clone().into_bytes();
    invalid_utf8.insert(text.len() - 2, 0xFF);
    vec![
        ("empty body", vec![]),
        ("whitespace only", b"  \n".to_vec()),
        (
            "unclosed object",
            text.as_bytes()[..text.len() - 1].to_vec(),
        ),
        ("cut after a key", format!("{{\"{first}\":").into_bytes()),
        (
            "trailing comma",
            format!("{},}}", &text[..text.len() - 1]).into_bytes(),
        ),
        ("single quotes", text.replace('"', "'").into_bytes()),
        ("bare word", b"nul".to_vec()),
        ("trailing data", format!("{text} {text}").into_bytes()),
        ("trailing garbage", format!("{text}x").into_bytes()),
        ("invalid UTF-8", invalid_utf8),
        ("a number out of range", b"1e400".to_vec()),
    ]
}

/// Bad path ids.
const BAD_IDS: [&str; 6] = [
    "not-a-uuid",
    "123",
    "%FF%FE",
    "0000000000000000000000000000000000000000",
    "3f0e8a52-6b1e-4c4b-9d0f-2a7c1b5e9d1",
    "3f0e8a52-6b1e-4c4b-9d0f-2a7c1b5e9d11x",
];

/// Every generic bad request of one command endpoint.
fn generic_cases(c: &Command) -> Vec<Case> {
    let mut cases = vec![];
    // Each request from its own caller: they are all refused before the caller matters, and
    // per-user limits (rate limits) must not decide the answer.
    let post = |body: &Value| Req::post(&c.uri, Some(Uuid::new_v4()), body);
    let raw = |bytes: Vec<u8>| Req::post_raw(&c.uri, Some(Uuid::new_v4()), bytes);
    let n = c.name;
    for (what, bytes) in malformed_json(&c.valid, c.required[0]) {
        cases.push(case(
            format!("{n}: {what}"),
            raw(bytes),
            BAD_REQUEST,
            "malformed_json",
        ));
    }
    // Valid JSON that is not an object, including the fields as an array (serde's derived
    // structs accept that form unless told otherwise).
    for (what, v) in [
        ("the field values as an array", c.array_form.clone()),
        ("an empty array", json!([])),
        ("a string", json!("hello")),
        ("a number", json!(42)),
        ("null", Value::Null),
        ("true", json!(true)),
    ] {
        cases.push(case(
            format!("{n}: {what}"),
            post(&v),
            UNPROCESSABLE,
            "invalid_body",
        ));
    }
    // Unknown fields.
    for extra in ["extra", "Display_Name", "user", ""] {
        let mut v = c.valid.clone();
        v[extra] = json!(1);
        cases.push(case(
            format!("{n}: unknown field {extra:?}"),
            post(&v),
            UNPROCESSABLE,
            "invalid_body",
        ));
    }
    // Missing fields.
    cases.push(case(
        format!("{n}: empty object"),
        post(&json!({})),
        UNPROCESSABLE,
        "invalid_body",
    ));
    for field in c.required {
        let mut v = c.valid.clone();
        v.as_object_mut().unwrap().remove(*field);
        cases.push(case(
            format!("{n}: missing {field}"),
            post(&v),
            UNPROCESSABLE,
            "invalid_body",
        ));
    }
    // Wrong types, for every field (optional ids included).
    let fields = c.required.iter().map(|f| (f, true));
    for (field, required) in fields.chain(c.optional.iter().map(|f| (f, false))) {
        for wrong in wrong_types(field, required) {
            let mut v = c.valid.clone();
            v[field] = wrong.clone();
            cases.push(case(
                format!("{n}: {field} = {wrong}"),
                post(&v),
                UNPROCESSABLE,
                "invalid_body",
            ));
        }
    }
    // A field twice.
    let first = c.required[0];
    let text = c.valid.to_string();
    let twice = format!(
        "{{\"{first}\":{},{}",
        c.valid[first],
        &text[1..] // `"first":…,…}` again
    );
    cases.push(case(
        format!("{n}: {first} twice"),
        raw(twice.into_bytes()),
        UNPROCESSABLE,
        "invalid_body",
    ));
    // Deeply nested values: refused, whichever way.
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let mut nested = text.clone();
    nested.insert_str(1, &format!("\"nested\":{deep},"));
    cases.push(Case {
        what: format!("{n}: 200 levels of nesting"),
        req: raw(nested.into_bytes()),
        status: None,
        code: None,
    });
    // Oversize bodies: padded valid JSON, a long string value, and a chunked stream.
    let mut padded = text.clone().into_bytes();
    padded.resize(BODY_LIMIT + 1, b' ');
    cases.push(case(
        format!("{n}: valid JSON padded to the limit + 1 byte"),
        raw(padded.clone()),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    ));
    let mut long = c.valid.clone();
    long[c.required[0]] = json!("x".repeat(BODY_LIMIT));
    cases.push(case(
        format!("{n}: a 64 KiB string"),
        post(&long),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    ));
    let mut streamed = raw(vec![]);
    streamed.body = Payload::Stream(vec![b' '; 4 * BODY_LIMIT]);
    cases.push(case(
        format!("{n}: a 256 KiB chunked body"),
        streamed,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    ));
    // Not JSON at all.
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut r = post(&c.valid);
        r.content_type = ct.map(String::from);
        cases.push(case(
            format!("{n}: content type {ct:?}"),
            r,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ));
    }
    // Invalid path ids.
    if let Some(id) = &c.path_id {
        for bad in BAD_IDS {
            cases.push(case(
                format!("{n}: path id {bad:?}"),
                Req::post(
                    &c.uri.replace(id.as_str(), bad),
                    Some(Uuid::new_v4()),
                    &c.valid,
                ),
                BAD_REQUEST,
                "invalid_path",
            ));
        }
    }
    cases
}

/// Out-of-range values and unknown references, endpoint by endpoint.
fn specific_cases(w: &World) -> Vec<Case> {
    let (ada, q, a, q2, a2) = (w.ada, w.q, w.a, w.q2, w.a2);
    let missing = Uuid::new_v4();
    // A new, unregistered caller for each request whose answer does not depend on who asks
    // (values are checked and references looked up before the caller is): every caller sends
    // only a few requests, so that per-user rate limits never decide an answer.
    let anyone = Uuid::new_v4;
    let invalid = |what: &str, uri: &str, caller: Uuid, body: Value| {
        case(
            what,
            Req::post(uri, Some(caller), &body),
            UNPROCESSABLE,
            "invalid",
        )
    };
    let refused = |what: &str, uri: &str, caller: Uuid, body: Value, s, code| {
        case(what, Req::post(uri, Some(caller), &body), s, code)
    };
    let question = |title: Value, tags: Value| json!({"title": title, "body": "", "tags": tags});
    let eleven: Vec<String> = (0..11).map(|i| format!("t{i}")).collect();
    let answers = format!("/v1/questions/{q}/answers");
    let accept = format!("/v1/questions/{q}/accept");
    let comments = format!("/v1/content/{q}/comments");
    let votes = format!("/v1/content/{q}/votes");
    vec![
        // Registration.
        invalid(
            "empty name",
            "/v1/users",
            anyone(),
            json!({"display_name": ""}),
        ),
        invalid(
            "101-character name",
            "/v1/users",
            anyone(),
            json!({"display_name": "n".repeat(101)}),
        ),
        refused(
            "another user's id",
            "/v1/users",
            anyone(),
            json!({"display_name": "Eve", "user_id": ada}),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        refused(
            "an existing id with another name",
            "/v1/users",
            ada,
            json!({"display_name": "Not Ada"}),
            StatusCode::CONFLICT,
            "conflict",
        ),
        // Questions.
        invalid(
            "empty title",
            "/v1/questions",
            anyone(),
            question(json!(""), json!([])),
        ),
        invalid(
            "301-character title",
            "/v1/questions",
            anyone(),
            question(json!("t".repeat(301)), json!([])),
        ),
        invalid(
            "11 tags",
            "/v1/questions",
            anyone(),
            question(json!("T"), json!(eleven)),
        ),
        invalid(
            "an empty tag",
            "/v1/questions",
            anyone(),
            question(json!("T"), json!([""])),
        ),
        invalid(
            "a 36-character tag",
            "/v1/questions",
            anyone(),
            question(json!("T"), json!(["t".repeat(36)])),
        ),
        invalid(
            "a tag with a space",
            "/v1/questions",
            anyone(),
            question(json!("T"), json!(["a b"])),
        ),
        refused(
            "an unregistered author",
            "/v1/questions",
            anyone(),
            question(json!("T"), json!([])),
            NOT_FOUND,
            "not_found.user",
        ),
        refused(
            "the id of an existing answer",
            "/v1/questions",
            anyone(),
            json!({"question_id": a, "title": "T", "body": "", "tags": []}),
            StatusCode::CONFLICT,
            "conflict",
        ),
        // Answers.
        invalid("an empty answer", &answers, anyone(), json!({"body": ""})),
        refused(
            "an answer to a missing question",
            &format!("/v1/questions/{missing}/answers"),
            anyone(),
            json!({"body": "B"}),
            NOT_FOUND,
            "not_found.question",
        ),
        refused(
            "an answer to an answer",
            &format!("/v1/questions/{a}/answers"),
            anyone(),
            json!({"body": "B"}),
            NOT_FOUND,
            "not_found.question",
        ),
        refused(
            "an answer by an unregistered user",
            &answers,
            anyone(),
            json!({"body": "B"}),
            NOT_FOUND,
            "not_found.user",
        ),
        refused(
            "the id of an existing question",
            &answers,
            anyone(),
            json!({"answer_id": q2, "body": "B"}),
            StatusCode::CONFLICT,
            "conflict",
        ),
        // Accepts.
        refused(
            "accept on a missing question",
            &format!("/v1/questions/{missing}/accept"),
            anyone(),
            json!({ "answer_id": a }),
            NOT_FOUND,
            "not_found.question",
        ),
        refused(
            "accept of a missing answer",
            &accept,
            ada,
            json!({ "answer_id": missing }),
            NOT_FOUND,
            "not_found.answer",
        ),
        refused(
            "accept of another question's answer",
            &accept,
            ada,
            json!({ "answer_id": a2 }),
            StatusCode::CONFLICT,
            "conflict",
        ),
        refused(
            "accept on an answer",
            &format!("/v1/questions/{a}/accept"),
            anyone(),
            json!({ "answer_id": a }),
            NOT_FOUND,
            "not_found.question",
        ),
        refused(
            "accept by someone else than the asker",
            &accept,
            anyone(),
            json!({ "answer_id": a }),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        // Comments.
        invalid("an empty comment", &comments, anyone(), json!({"text": ""})),
        invalid(
            "a 601-character comment",
            &comments,
            anyone(),
            json!({"text": "c".repeat(601)}),
        ),
        refused(
            "a comment on missing content",
            &format!("/v1/content/{missing}/comments"),
            anyone(),
            json!({"text": "C"}),
            NOT_FOUND,
            "not_found.content",
        ),
        refused(
            "a comment by an unregistered user",
            &comments,
            anyone(),
            json!({"text": "C"}),
            NOT_FOUND,
            "not_found.user",
        ),
        // Votes.
        refused(
            "a vote on missing content",
            &format!("/v1/content/{missing}/votes"),
            anyone(),
            json!({"direction": "up"}),
            NOT_FOUND,
            "not_found.content",
        ),
        refused(
            "a vote by an unregistered user",
            &votes,
            anyone(),
            json!({"direction": "down"}),
            NOT_FOUND,
            "not_found.user",
        ),
    ]
}

/// Bad queries: invalid path ids and boards, out-of-range and malformed parameters, unknown
/// rows, wrong methods.
fn query_cases(w: &World) -> Vec<Case> {
    let ada = w.ada;
    let missing = Uuid::new_v4();
    let get = |what: String, uri: String, status, code| case(what, Req::get(&uri), status, code);
    let mut cases = vec![];
    for bad in BAD_IDS {
        for uri in [
            format!("/v1/users/{bad}/xp"),
            format!("/v1/users/{bad}/quota"),
            format!("/v1/content/{bad}"),
            format!("/v1/leaderboards/all-time/users/{bad}"),
        ] {
            cases.push(get(
                format!("bad id {bad:?}"),
                uri,
                BAD_REQUEST,
                "invalid_path",
            ));
        }
    }
    let long_tag = "t".repeat(36);
    for board in [
        "monthly",
        "ALL-TIME",
        "all-time%00",
        "weekly:2024-W60",
        "weekly:2021-W53",
        "weekly:2024-W1",
        "weekly:24-W01",
        "weekly:",
        "tag:",
        "tag:a%20b",
        "tag:a%2Fb",
        long_tag.as_str(),
        "%FF",
    ] {
        let board = if board == long_tag {
            format!("tag:{board}")
        } else {
            board.to_string()
        };
        cases.push(get(
            format!("bad board {board:?}"),
            format!("/v1/leaderboards/{board}"),
            BAD_REQUEST,
            "invalid_path",
        ));
        cases.push(get(
            format!("bad board {board:?}"),
            format!("/v1/leaderboards/{board}/users/{ada}"),
            BAD_REQUEST,
            "invalid_path",
        ));
    }
    for query in [
        "limit=0",
        "limit=101",
        "limit=100000",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "limit=",
        "limit=4294967296",
        "limit=1&limit=2",
        "offset=-1",
        "offset=abc",
        "offset=",
        "offset=9223372036854775808",
        "offset=18446744073709551616",
        "limit=10&offset=-5",
    ] {
        cases.push(get(
            format!("leaderboard ?{query}"),
            format!("/v1/leaderboards/all-time?{query}"),
            BAD_REQUEST,
            "invalid_query",
        ));
    }
    for period in [
        "2024-13",
        "2024-00",
        "2024-1",
        "24-01",
        "2024/01",
        "2024-01-01",
        "",
        "abcd-ef",
        "%FF",
        "2024-%C3%A9",
    ] {
        cases.push(get(
            format!("quota period {period:?}"),
            format!("/v1/users/{ada}/quota?period={period}"),
            BAD_REQUEST,
            "invalid_query",
        ));
    }
    // Unknown rows.
    for uri in [
        format!("/v1/users/{missing}/xp"),
        format!("/v1/users/{missing}/quota?period=2024-01"),
        format!("/v1/content/{missing}"),
        format!("/v1/leaderboards/all-time/users/{missing}"),
    ] {
        cases.push(get("unknown row".into(), uri, NOT_FOUND, "not_found"));
    }
    // Wrong methods (queries are GET only).
    for uri in [
        format!("/v1/users/{ada}/xp"),
        format!("/v1/users/{ada}/quota"),
        "/v1/leaderboards/all-time".to_string(),
        format!("/v1/leaderboards/all-time/users/{ada}"),
        format!("/v1/content/{}", w.q),
        "/v1/projections".to_string(),
    ] {
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            let mut r = Req::post(&uri, Some(ada), &json!({}));
            r.method = method.clone();
            cases.push(case(
                format!("{method} on a query"),
                r,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            ));
        }
    }
    cases
}

#[tokio::test]
async fn every_bad_request_is_a_problem_and_writes_nothing() {
    let h = Harness::new().await;
    let w = world(&h).await;
    let head = h.head().await;
    assert_eq!(head.events, 6, "2 users, 2 questions, 2 answers");

    let mut cases = vec![];
    for c in commands(&w) {
        cases.extend(generic_cases(&c));
    }
    cases.extend(specific_cases(&w));
    cases.extend(query_cases(&w));
    assert!(cases.len() > 400, "{} cases", cases.len());
    for c in &cases {
        h.check(c, head).await;
    }

    // Queries take no body: one sent with a GET is never read (not even an oversize or
    // malformed one) and the answer is the same as without it.
    let q = w.q;
    for uri in [
        format!("/v1/users/{}/xp", w.ada),
        format!("/v1/users/{}/quota?period=2024-01", w.ada),
        "/v1/leaderboards/all-time?limit=5".to_string(),
        format!("/v1/leaderboards/all-time/users/{}", w.ada),
        format!("/v1/content/{q}"),
        "/v1/projections?unknown=1&limit=abc".to_string(),
    ] {
        let plain = h.send(&Req::get(&uri)).await;
        for body in [b"{".to_vec(), vec![b'x'; 2 * BODY_LIMIT]] {
            let mut r = Req::get(&uri);
            r.content_type = Some("application/json".into());
            r.body = Payload::Bytes(body);
            let with_body = h.send(&r).await;
            assert_eq!(with_body.status, plain.status, "GET {uri} with a body");
            assert_eq!(with_body.text, plain.text, "GET {uri} with a body");
        }
        assert_eq!(h.head().await, head, "GET {uri}");
    }
    let r = h.send(&Req::get("/v1/projections")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["head_position"], head.position);

    // The control: every endpoint's valid body, as its caller, is accepted (so the refusals
    // above were about the bad parts only).
    for c in commands(&w) {
        let r = h.send(&Req::post(&c.uri, Some(c.caller), &c.valid)).await;
        assert!(
            r.status.is_success(),
            "{}: valid body refused: {} {}",
            c.name,
            r.status,
            r.text
        );
    }
    assert!(h.head().await.position > head.position);
}

#[tokio::test]
async fn the_body_limit_is_64_kib_exactly() {
    let h = Harness::new().await;
    let w = world(&h).await;
    let uri = format!("/v1/content/{}/comments", w.q);
    let body = |len: usize| {
        let mut b = serde_json::to_vec(&json!({"text": "at the limit"})).unwrap();
        b.resize(len, b' ');
        b
    };
    let head = h.head().await;
    let r = h
        .send(&Req::post_raw(&uri, Some(w.bob), body(BODY_LIMIT + 1)))
        .await;
    assert_problem(
        &r,
        Some(StatusCode::PAYLOAD_TOO_LARGE),
        Some("payload_too_large"),
        "limit + 1",
    );
    assert_eq!(h.head().await, head);
    let r = h
        .send(&Req::post_raw(&uri, Some(w.bob), body(BODY_LIMIT)))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(h.head().await.events, head.events + 1);
}

// ---------------------------------------------------------------------------------------------
// Property tests of the body decoder.

/// Field names of a body type: all of them, and the required ones.
struct Shape {
    fields: &'static [&'static str],
    required: &'static [&'static str],
    valid: fn() -> Value,
}

const SHAPES: [(&str, Shape); 6] = [
    (
        "register",
        Shape {
            fields: &["user_id", "display_name"],
            required: &["display_name"],
            valid: || json!({"display_name": "Ada"}),
        },
    ),
    (
        "question",
        Shape {
            fields: &["question_id", "title", "body", "tags"],
            required: &["title", "body", "tags"],
            valid: || json!({"title": "T", "body": "", "tags": ["a"]}),
        },
    ),
    (
        "answer",
        Shape {
            fields: &["answer_id", "body"],
            required: &["body"],
            valid: || json!({"body": "B"}),
        },
    ),
    (
        "comment",
        Shape {
            fields: &["comment_id", "text"],
            required: &["text"],
            valid: || json!({"text": "C", "comment_id": "3f0e8a52-6b1e-4c4b-9d0f-2a7c1b5e9d11"}),
        },
    ),
    (
        "vote",
        Shape {
            fields: &["direction"],
            required: &["direction"],
            valid: || json!({"direction": "down"}),
        },
    ),
    (
        "accept",
        Shape {
            fields: &["answer_id"],
            required: &["answer_id"],
            valid: || json!({"answer_id": "3f0e8a52-6b1e-4c4b-9d0f-2a7c1b5e9d11"}),
        },
    ),
];

/// Decodes `bytes` as body type `T` through `ApiJson`: `None` when accepted, else the
/// response it is rejected with.
fn rejection<T: DeserializeOwned>(bytes: &[u8]) -> Option<axum::response::Response> {
    let req = Request::builder()
        .method(Method::POST)
        .uri("/")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes.to_vec()))
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(ApiJson::<T>::from_request(req, &()))
        .err()
        .map(IntoResponse::into_response)
}

/// Decodes `bytes` with the body type of `shape_name`: `None` when accepted, else the
/// rejection.
fn rejection_as(shape_name: &str, bytes: &[u8]) -> Option<axum::response::Response> {
    match shape_name {
        "register" => rejection::<RegisterBody>(bytes),
        "question" => rejection::<QuestionBody>(bytes),
        "answer" => rejection::<AnswerBody>(bytes),
        "comment" => rejection::<CommentBody>(bytes),
        "vote" => rejection::<VoteBody>(bytes),
        "accept" => rejection::<AcceptBody>(bytes),
        other => panic!("no body type {other}"),
    }
}

/// The property: an accepted body is a JSON object with only known fields and every required
/// one; a rejected body is a 400 `malformed_json` (only when the bytes are not JSON) or a 422
/// `invalid_body` problem.
fn check_decoder(shape_index: usize, bytes: &[u8]) -> Result<(), TestCaseError> {
    let (name, shape) = &SHAPES[shape_index];
    let parsed: Option<Value> = serde_json::from_slice(bytes).ok();
    match rejection_as(name, bytes) {
        None => {
            let object: Option<&Map<String, Value>> = parsed.as_ref().and_then(Value::as_object);
            prop_assert!(object.is_some(), "{}: accepted a non-object", name);
            let object = object.unwrap();
            for key in object.keys() {
                prop_assert!(
                    shape.fields.contains(&key.as_str()),
                    "{}: accepted unknown field {:?}",
                    name,
                    key
                );
            }
            for field in shape.required {
                prop_assert!(
                    object.get(*field).is_some_and(|v| !v.is_null()),
                    "{}: accepted without {}",
                    name,
                    field
                );
            }
        }
        Some(resp) => {
            let status = resp.status();
            let content_type = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            prop_assert!(status.is_client_error(), "{}: {}", name, status);
            prop_assert_eq!(content_type.as_deref(), Some(PROBLEM_CONTENT_TYPE));
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let body = rt.block_on(resp.into_body().collect()).unwrap().to_bytes();
            let problem: ProblemBody = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("not a problem body: {e}")))?;
            prop_assert_eq!(problem.status, status.as_u16());
            let code = problem.type_uri.trim_start_matches(PROBLEM_TYPE_BASE);
            if parsed.is_some() {
                prop_assert_eq!((status, code), (UNPROCESSABLE, "invalid_body"));
            } else {
                prop_assert!(
                    [
                        (BAD_REQUEST, "malformed_json"),
                        (UNPROCESSABLE, "invalid_body")
                    ]
                    .contains(&(status, code)),
                    "{}: {} {}",
                    name,
                    status,
                    code
                );
            }
        }
    }
    Ok(())
}

/// Any JSON value, a few levels deep, with keys that are often the body types' field names.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        3 => prop::sample::select(vec![
            "user_id", "display_name", "question_id", "title", "body", "tags", "answer_id",
            "comment_id", "text", "direction",
        ])
        .prop_map(String::from),
        1 => "[a-zA-Z_]{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(vec![
            "up",
            "down",
            "",
            "Ada",
            "3f0e8a52-6b1e-4c4b-9d0f-2a7c1b5e9d11",
            "rust",
        ])
        .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A change to a valid body.
#[derive(Debug, Clone)]
enum Tweak {
    Remove(usize),
    Set(usize, Value),
    Add(String, Value),
}

fn tweak() -> impl Strategy<Value = Tweak> {
    prop_oneof![
        any::<usize>().prop_map(Tweak::Remove),
        (any::<usize>(), json_value()).prop_map(|(i, v)| Tweak::Set(i, v)),
        ("[a-z_]{0,12}", json_value()).prop_map(|(k, v)| Tweak::Add(k, v)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn decoders_on_arbitrary_json_values(s in 0..SHAPES.len(), v in json_value()) {
        check_decoder(s, &serde_json::to_vec(&v).unwrap())?;
    }

    #[test]
    fn decoders_on_near_valid_bodies(s in 0..SHAPES.len(), tweaks in prop::collection::vec(tweak(), 0..3)) {
        let shape = &SHAPES[s].1;
        let mut v = (shape.valid)();
        for t in tweaks {
            let object = v.as_object_mut().unwrap();
            match t {
                Tweak::Remove(i) => {
                    if let Some(k) = object.keys().nth(i % object.len().max(1)).cloned() {
                        object.remove(&k);
                    }
                }
                Tweak::Set(i, value) => {
                    let field = shape.fields[i % shape.fields.len()];
                    object.insert(field.to_string(), value);
                }
                Tweak::Add(k, value) => {
                    object.insert(k, value);
                }
            }
        }
        check_decoder(s, &serde_json::to_vec(&v).unwrap())?;
    }

    #[test]
    fn decoders_on_arbitrary_bytes(s in 0..SHAPES.len(), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        check_decoder(s, &bytes)?;
    }

    #[test]
    fn decoders_on_mutated_valid_bodies(
        s in 0..SHAPES.len(),
        at in any::<prop::sample::Index>(),
        byte in prop::sample::select(b"{}[],:\"\\ 0aZ\xff".to_vec()),
        cut in any::<bool>(),
    ) {
        let mut bytes = serde_json::to_vec(&(SHAPES[s].1.valid)()).unwrap();
        let i = at.index(bytes.len() + 1);
        if cut {
            bytes.truncate(i);
        } else {
            bytes.insert(i, byte);
        }
        check_decoder(s, &bytes)?;
    }
}

#[test]
fn valid_bodies_are_accepted() {
    // The control for the properties: each shape's valid body decodes.
    for (name, shape) in &SHAPES {
        let bytes = serde_json::to_vec(&(shape.valid)()).unwrap();
        assert!(rejection_as(name, &bytes).is_none(), "{name}");
    }
}
