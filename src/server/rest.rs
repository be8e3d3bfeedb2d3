//! The REST shim: HTTP/JSON requests matched against the `google.api.http` rules of the
//! protos, at run time, from the same descriptor set reflection serves. A matched
//! request becomes a gRPC request of its method (canonical proto3 JSON decoded against
//! the method's input type, path variables and query parameters folded in) and is sent
//! through the server's own gRPC stack, in process: the same deadline, authentication,
//! validation and error mapping decide it. The answer comes back as canonical JSON, or
//! as a `google.rpc.Status` JSON body with its details and the HTTP status
//! `error::http_status` derives from the gRPC code.

use base64::Engine;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode, header};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, MethodDescriptor,
    SerializeOptions,
};
use serde_json::{Map, Value};

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    /// A variable: the field path it sets, and how many path segments it takes
    /// (`None` for `**`, the rest), with the literals it must see among them.
    Variable {
        field: Vec<String>,
        pattern: Vec<Option<String>>,
        rest: bool,
    },
}

/// One `google.api.http` binding.
#[derive(Debug, Clone)]
pub struct Route {
    method: Method,
    segments: Vec<Segment>,
    verb: Option<String>,
    body: String,
    response_body: String,
    /// `/package.Service/Method`.
    pub grpc_path: String,
    /// The method: its input and output types, and its documentation.
    rpc: MethodDescriptor,
    /// A server-streaming method: its messages are answered as they come, one JSON
    /// document per line (or as server-sent events).
    pub streaming: bool,
}

/// The path variables a route bound: each field path and its (decoded) value.
pub type Bound = Vec<(Vec<String>, String)>;

/// A request the shim could not turn into a call: the HTTP status and the message.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub code: tonic::Code,
    pub message: String,
}

fn bad_request(message: impl Into<String>) -> Refused {
    Refused {
        status: StatusCode::BAD_REQUEST,
        code: tonic::Code::InvalidArgument,
        message: message.into(),
    }
}

/// Parses `/v1/{name=users/*/sessions/*}:heartbeat` into segments and a verb.
fn parse_template(template: &str) -> Option<(Vec<Segment>, Option<String>)> {
    let mut rest = template.strip_prefix('/')?;
    let mut segments = Vec::new();
    let mut verb = None;
    while !rest.is_empty() {
        if let Some(inner) = rest.strip_prefix('{') {
            let end = inner.find('}')?;
            let (field, pattern) = match inner[..end].split_once('=') {
                Some((field, pattern)) => (field, pattern),
                None => (&inner[..end], "*"),
            };
            let parts: Vec<&str> = pattern.split('/').collect();
            let rest_all = parts.last() == Some(&"**");
            segments.push(Segment::Variable {
                field: field.split('.').map(str::to_owned).collect(),
                pattern: parts
                    .iter()
                    .filter(|p| **p != "**")
                    .map(|p| (*p != "*").then(|| (*p).to_owned()))
                    .collect(),
                rest: rest_all,
            });
            rest = &inner[end + 1..];
        } else {
            let end = rest.find(['/', ':']).unwrap_or(rest.len());
            segments.push(Segment::Literal(rest[..end].to_owned()));
            rest = &rest[end..];
        }
        if let Some(v) = rest.strip_prefix(':') {
            verb = Some(v.to_owned());
            rest = "";
        }
        rest = rest.strip_prefix('/').unwrap_or(rest);
    }
    Some((segments, verb))
}

fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Route {
    /// The variables of `path` if it matches this route.
    fn matches(&self, path: &str) -> Option<Bound> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => path.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => path,
        };
        let parts: Vec<&str> = path.split('/').collect();
        let mut at = 0;
        let mut bound = Vec::new();
        for segment in &self.segments {
            match segment {
                Segment::Literal(literal) => {
                    if parts.get(at) != Some(&literal.as_str()) {
                        return None;
                    }
                    at += 1;
                }
                Segment::Variable {
                    field,
                    pattern,
                    rest,
                } => {
                    let take = if *rest {
                        parts.len().checked_sub(at)?
                    } else {
                        pattern.len()
                    };
                    let taken = parts.get(at..at + take)?;
                    for (part, expected) in taken.iter().zip(pattern) {
                        let fits = match expected {
                            Some(literal) => part == literal,
                            None => !part.is_empty(),
                        };
                        if !fits {
                            return None;
                        }
                    }
                    let decoded: Option<Vec<String>> =
                        taken.iter().map(|p| percent_decode(p)).collect();
                    bound.push((field.clone(), decoded?.join("/")));
                    at += take;
                }
            }
        }
        (at == parts.len()).then_some(bound)
    }
}

/// Every binding of the annotated unary and server-streaming methods of `pool`.
pub fn routes(pool: &DescriptorPool) -> Vec<Route> {
    let Some(http) = pool.get_extension_by_name("google.api.http") else {
        return Vec::new();
    };
    let mut routes = Vec::new();
    for service in pool.services() {
        for method in service.methods() {
            if method.is_client_streaming() {
                continue;
            }
            let options = method.options();
            if !options.has_extension(&http) {
                continue;
            }
            let Some(rule) = options.get_extension(&http).as_message().cloned() else {
                continue;
            };
            let mut rules = vec![rule.clone()];
            if let Some(more) = rule.get_field_by_name("additional_bindings")
                && let Some(list) = more.as_list()
            {
                rules.extend(list.iter().filter_map(|v| v.as_message().cloned()));
            }
            for rule in rules {
                let text = |name: &str| {
                    rule.get_field_by_name(name)
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                };
                let (verb, template) = ["get", "put", "post", "delete", "patch"]
                    .iter()
                    .find_map(|verb| {
                        rule.has_field_by_name(verb)
                            .then(|| (verb.to_ascii_uppercase(), text(verb)))
                    })
                    .unwrap_or_default();
                let (Ok(method_verb), Some((segments, custom))) = (
                    Method::from_bytes(verb.as_bytes()),
                    parse_template(&template),
                ) else {
                    continue;
                };
                routes.push(Route {
                    method: method_verb,
                    segments,
                    verb: custom,
                    body: text("body"),
                    response_body: text("response_body"),
                    grpc_path: format!("/{}/{}", service.full_name(), method.name()),
                    rpc: method.clone(),
                    streaming: method.is_server_streaming(),
                });
            }
        }
    }
    routes
}

/// The route for `method` and `path`, with its bound variables; `Err(true)` when the
/// path is known under another method.
pub fn find<'a>(
    routes: &'a [Route],
    method: &Method,
    path: &str,
) -> Result<(&'a Route, Bound), bool> {
    let mut known_path = false;
    for route in routes {
        if let Some(bound) = route.matches(path) {
            if route.method == *method {
                return Ok((route, bound));
            }
            known_path = true;
        }
    }
    Err(known_path)
}

/// Sets `value` at `path` in a JSON object, making the objects on the way.
fn set_path(object: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = object;
    for name in parents {
        let next = at
            .entry(name.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !next.is_object() {
            *next = Value::Object(Map::new());
        }
        at = next.as_object_mut().expect("made an object");
    }
    at.insert(last.clone(), value);
}

/// Takes the value at `path` out of a JSON object, if there is one.
fn take_path(object: &mut Map<String, Value>, path: &[String]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut at = object;
    for name in parents {
        at = at.get_mut(name)?.as_object_mut()?;
    }
    at.remove(last)
}

/// The JSON a query parameter's text stands for, by the field's kind, and whether the
/// field is repeated (its parameter may come several times: each adds a value).
fn query_value(
    message: &MessageDescriptor,
    path: &[String],
    text: &str,
) -> Result<(Value, bool), Refused> {
    let mut descriptor = message.clone();
    let unknown = || bad_request(format!("unknown query parameter {:?}", path.join(".")));
    for (i, name) in path.iter().enumerate() {
        let field = descriptor
            .get_field_by_name(name)
            .or_else(|| descriptor.get_field_by_json_name(name))
            .ok_or_else(unknown)?;
        let last = i + 1 == path.len();
        let repeated = field.is_list();
        match field.kind() {
            Kind::Message(inner) if !last && !repeated => descriptor = inner,
            Kind::Bool if last => {
                return match text {
                    "true" => Ok((Value::Bool(true), repeated)),
                    "false" => Ok((Value::Bool(false), repeated)),
                    _ => Err(bad_request(format!(
                        "{}: expected true or false",
                        path.join(".")
                    ))),
                };
            }
            Kind::Message(_) if last => return Err(unknown()),
            _ if last => return Ok((Value::String(text.to_owned()), repeated)),
            _ => return Err(unknown()),
        }
    }
    Err(unknown())
}

fn query_pairs(query: &str) -> Result<Vec<(String, String)>, Refused> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| percent_decode(&s.replace('+', " "));
            match (decode(key), decode(value)) {
                (Some(key), Some(value)) => Ok((key, value)),
                _ => Err(bad_request("malformed query string")),
            }
        })
        .collect()
}

/// The gRPC request body (one length-prefixed message) of an HTTP request.
pub fn grpc_body(
    route: &Route,
    bound: Bound,
    query: Option<&str>,
    body: &[u8],
) -> Result<Bytes, Refused> {
    let mut object = Map::new();
    let body_text = std::str::from_utf8(body).map_err(|_| bad_request("the body is not UTF-8"))?;
    if !route.body.is_empty() && !body_text.trim().is_empty() {
        let parsed: Value = serde_json::from_str(body_text)
            .map_err(|e| bad_request(format!("malformed JSON body: {e}")))?;
        if route.body == "*" {
            match parsed {
                Value::Object(fields) => object = fields,
                _ => return Err(bad_request("the body must be a JSON object")),
            }
        } else {
            object.insert(route.body.clone(), parsed);
        }
    }
    for (field, value) in &bound {
        set_path(&mut object, field, Value::String(value.clone()));
    }
    if let Some(query) = query {
        for (key, text) in query_pairs(query)? {
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            if bound.iter().any(|(field, _)| field == &path) {
                continue;
            }
            if route.body == "*" {
                return Err(bad_request(format!(
                    "unknown query parameter {key:?}: this method takes its fields in the body"
                )));
            }
            let (value, repeated) = query_value(&route.rpc.input(), &path, &text)?;
            if repeated {
                let mut values = match take_path(&mut object, &path) {
                    Some(Value::Array(values)) => values,
                    _ => Vec::new(),
                };
                values.push(value);
                set_path(&mut object, &path, Value::Array(values));
            } else {
                set_path(&mut object, &path, value);
            }
        }
    }
    let message = DynamicMessage::deserialize_with_options(
        route.rpc.input(),
        Value::Object(object),
        &DeserializeOptions::new(),
    )
    .map_err(|e| bad_request(format!("invalid request: {e}")))?;
    let encoded = message.encode_to_vec();
    let mut framed = BytesMut::with_capacity(encoded.len() + 5);
    framed.put_u8(0);
    framed.put_u32(encoded.len() as u32);
    framed.put_slice(&encoded);
    Ok(framed.freeze())
}

/// The JSON of a successful answer: the method's output message (or its
/// `response_body` field), from one length-prefixed gRPC message.
pub fn json_answer(route: &Route, mut framed: Bytes) -> Result<String, String> {
    if framed.len() < 5 {
        return Err("the answer has no message".into());
    }
    framed.advance(5);
    let message = DynamicMessage::decode(route.rpc.output(), framed).map_err(|e| e.to_string())?;
    // `response_body` names the field to answer with (a message field in every rule
    // that uses it); otherwise the whole message.
    let answer = match message.get_field_by_name(&route.response_body) {
        Some(field) if !route.response_body.is_empty() => match field.as_message() {
            Some(inner) => inner.clone(),
            None => return Err("response_body names a field that is not a message".into()),
        },
        _ => message,
    };
    // Every field, set or not, as grpc-gateway's default marshaler does (EmitUnpopulated):
    // a client reads `"admitted": false` rather than an absent field.
    let mut out = serde_json::Serializer::new(Vec::new());
    answer
        .serialize_with_options(
            &mut out,
            &SerializeOptions::new().skip_default_fields(false),
        )
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.into_inner()).into_owned())
}

/// The `google.rpc.Status` JSON of a refusal: the details from `grpc-status-details-bin`
/// when the server sent them, or the code and message alone.
pub fn status_json(
    pool: &DescriptorPool,
    code: i32,
    message: &str,
    details: Option<&[u8]>,
) -> String {
    if let (Some(bytes), Some(descriptor)) =
        (details, pool.get_message_by_name("google.rpc.Status"))
        && let Ok(status) = DynamicMessage::decode(descriptor, bytes)
    {
        let mut out = serde_json::Serializer::new(Vec::new());
        if status
            .serialize_with_options(&mut out, &SerializeOptions::new())
            .is_ok()
        {
            return String::from_utf8_lossy(&out.into_inner()).into_owned();
        }
    }
    serde_json::json!({ "code": code, "message": message, "details": [] }).to_string()
}

/// The grpc-status, grpc-message and decoded details of an answer's headers or trailers.
pub fn grpc_outcome(headers: &HeaderMap) -> Option<(i32, String, Option<Vec<u8>>)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .and_then(percent_decode)
        .unwrap_or_default();
    let details = headers
        .get("grpc-status-details-bin")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(v.trim_end_matches('='))
                .ok()
        });
    Some((code, message, details))
}

/// The headers of the in-process gRPC request: the caller's credentials and deadline.
pub fn grpc_headers(from: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        "application/grpc".parse().expect("static"),
    );
    headers.insert("te", "trailers".parse().expect("static"));
    for name in [
        header::AUTHORIZATION.as_str(),
        "grpc-timeout",
        "x-request-id",
    ] {
        if let Some(value) = from.get(name) {
            headers.insert(
                name.parse::<header::HeaderName>().expect("known"),
                value.clone(),
            );
        }
    }
    headers
}

/// The comment above the proto element at `path` of `file`, from its source info.
fn doc(file: &prost_reflect::FileDescriptor, path: &[i32]) -> String {
    file.file_descriptor_proto()
        .source_code_info
        .as_ref()
        .and_then(|info| info.location.iter().find(|l| l.path == path))
        .and_then(|l| l.leading_comments.as_ref())
        .map(|c| c.trim().replace('\n', " ").replace("  ", " "))
        .unwrap_or_default()
}

/// The JSON schema of one field's value in canonical proto3 JSON.
fn field_schema(field: &prost_reflect::FieldDescriptor) -> Value {
    let value = match field.kind() {
        Kind::Bool => serde_json::json!({"type": "boolean"}),
        Kind::String => serde_json::json!({"type": "string"}),
        Kind::Bytes => serde_json::json!({"type": "string", "format": "byte"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            serde_json::json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => {
            serde_json::json!({"type": "integer", "format": "int64", "minimum": 0})
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            serde_json::json!({"type": "string", "format": "int64"})
        }
        Kind::Uint64 | Kind::Fixed64 => serde_json::json!({"type": "string", "format": "uint64"}),
        Kind::Float | Kind::Double => serde_json::json!({"type": "number"}),
        Kind::Enum(e) => serde_json::json!({
            "type": "string",
            "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>(),
        }),
        Kind::Message(m) => message_ref(&m),
    };
    let value = if field.is_map() {
        let entry = match field.kind() {
            Kind::Message(m) => m,
            _ => unreachable!("a map field's kind is its entry"),
        };
        let values = entry.map_entry_value_field();
        serde_json::json!({"type": "object", "additionalProperties": field_schema(&values)})
    } else if field.is_list() {
        serde_json::json!({"type": "array", "items": value})
    } else {
        value
    };
    let description = doc(&field.parent_file(), field.path());
    match (value, description.is_empty()) {
        (Value::Object(mut object), false) if !object.contains_key("$ref") => {
            object.insert("description".into(), Value::String(description));
            Value::Object(object)
        }
        (value, _) => value,
    }
}

/// A message's schema reference; the well-known types are strings in JSON.
fn message_ref(message: &MessageDescriptor) -> Value {
    match message.full_name() {
        "google.protobuf.Timestamp" => serde_json::json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => {
            serde_json::json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$"})
        }
        "google.protobuf.Any" => serde_json::json!({
            "type": "object",
            "properties": {"@type": {"type": "string"}},
            "additionalProperties": true,
        }),
        name => serde_json::json!({"$ref": format!("#/components/schemas/{name}")}),
    }
}

/// Every message reachable from `message`, into `schemas`.
fn collect_schemas(message: &MessageDescriptor, schemas: &mut Map<String, Value>) {
    let name = message.full_name();
    if name.starts_with("google.protobuf.") || schemas.contains_key(name) {
        return;
    }
    schemas.insert(name.to_owned(), Value::Null);
    let mut properties = Map::new();
    for field in message.fields() {
        properties.insert(field.json_name().to_owned(), field_schema(&field));
        let nested = match field.kind() {
            Kind::Message(m) if field.is_map() => Some(m.map_entry_value_field().kind()),
            kind => Some(kind),
        };
        if let Some(Kind::Message(inner)) = nested {
            collect_schemas(&inner, schemas);
        }
    }
    let mut schema = serde_json::json!({"type": "object", "properties": properties});
    let description = doc(&message.parent_file(), message.path());
    if !description.is_empty() {
        schema["description"] = Value::String(description);
    }
    schemas.insert(name.to_owned(), schema);
}

/// The OpenAPI path of a template: each `*` of a variable becomes a parameter named
/// after the literal before it (`users/*` → `{user}`), so every parameter is one path
/// segment. Returns the path and its parameters.
fn openapi_path(route: &Route) -> (String, Vec<String>) {
    let mut path = String::new();
    let mut parameters = Vec::new();
    for segment in &route.segments {
        match segment {
            Segment::Literal(literal) => {
                path.push('/');
                path.push_str(literal);
            }
            Segment::Variable { field, pattern, .. } => {
                let mut previous = field.join(".");
                for part in pattern {
                    path.push('/');
                    match part {
                        Some(literal) => {
                            path.push_str(literal);
                            previous = literal.trim_end_matches('s').to_owned();
                        }
                        None => {
                            path.push_str(&format!("{{{previous}}}"));
                            parameters.push(previous.clone());
                        }
                    }
                }
            }
        }
    }
    if let Some(verb) = &route.verb {
        path.push(':');
        path.push_str(verb);
    }
    (path, parameters)
}

/// The OpenAPI 3 document of the REST shim: every route, its request and answer
/// schemas (canonical proto3 JSON, the proto comments as descriptions), the
/// `google.rpc.Status` error body, and the bearer security scheme.
pub fn openapi(pool: &DescriptorPool, routes: &[Route]) -> Value {
    let mut schemas = Map::new();
    let mut paths = Map::new();
    if let Some(status) = pool.get_message_by_name("google.rpc.Status") {
        collect_schemas(&status, &mut schemas);
    }
    // A stream that never ends is no request/response operation: the README documents
    // the streaming routes instead.
    for route in routes.iter().filter(|route| !route.streaming) {
        collect_schemas(&route.rpc.input(), &mut schemas);
        collect_schemas(&route.rpc.output(), &mut schemas);
        let (path, parameters) = openapi_path(route);
        let description = doc(&route.rpc.parent_file(), route.rpc.path());
        let mut operation = serde_json::json!({
            "operationId": route.grpc_path.trim_start_matches('/').replace('/', "."),
            "description": description,
            "parameters": parameters.iter().map(|name| serde_json::json!({
                "name": name, "in": "path", "required": true,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
            })).collect::<Vec<_>>(),
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": message_ref(&route.rpc.output())}},
                },
                "default": {
                    "description": "An error: the gRPC status as JSON, the HTTP status from its code",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}},
                },
            },
        });
        if !route.body.is_empty() {
            let schema = if route.body == "*" {
                message_ref(&route.rpc.input())
            } else {
                route
                    .rpc
                    .input()
                    .get_field_by_name(&route.body)
                    .map(|f| field_schema(&f))
                    .unwrap_or(Value::Null)
            };
            operation["requestBody"] = serde_json::json!({
                "required": true,
                "content": {"application/json": {"schema": schema}},
            });
        }
        let entry = paths
            .entry(path)
            .or_insert_with(|| Value::Object(Map::new()));
        entry[route.method.as_str().to_ascii_lowercase()] = operation;
    }
    serde_json::json!({
        "openapi": "3.0.3",
        "info": {
            "title": "usher",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The REST shim of usher's gRPC services: the google.api.http rules of proto/usher/v1, in canonical proto3 JSON.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http", "scheme": "bearer",
                    "description": "A service key, or a device's playback token on device calls",
                },
            },
        },
        "security": [{"bearer": []}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> DescriptorPool {
        let mut pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        pool.decode_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .unwrap();
        pool
    }

    #[test]
    fn templates_match_paths_with_variables_and_verbs() {
        let routes = routes(&pool());
        let find_path = |method: Method, path: &str| {
            find(&routes, &method, path).map(|(r, bound)| (r.grpc_path.clone(), bound))
        };
        let (path, bound) =
            find_path(Method::POST, "/v1/users/alice/sessions/s-1:heartbeat").unwrap();
        assert_eq!(path, "/usher.v1.PlaybackSessionService/Heartbeat");
        assert_eq!(
            bound,
            [(
                vec!["name".to_owned()],
                "users/alice/sessions/s-1".to_owned()
            )]
        );
        let (path, _) = find_path(Method::GET, "/v1/users/alice/sessions/s-1").unwrap();
        assert_eq!(path, "/usher.v1.PlaybackSessionService/GetSession");
        let (path, bound) = find_path(Method::GET, "/v1/users/roku%3A1/sessions").unwrap();
        assert_eq!(path, "/usher.v1.PlaybackSessionService/ListSessions");
        assert_eq!(bound[0].1, "users/roku:1");
        let (path, _) = find_path(Method::GET, "/v1/users/bo/concurrency").unwrap();
        assert_eq!(path, "/usher.v1.ConcurrencyService/GetConcurrency");
        let (path, _) =
            find_path(Method::POST, "/v1/users/bo/concurrency:checkAvailability").unwrap();
        assert_eq!(path, "/usher.v1.ConcurrencyService/CheckAvailability");
        assert_eq!(
            find_path(Method::POST, "/v1/tokens:validate").unwrap().0,
            "/usher.v1.TokenService/ValidateToken"
        );
        assert_eq!(
            find_path(Method::DELETE, "/v1/users/a/sessions/s").err(),
            Some(true)
        );
        assert_eq!(
            find_path(Method::GET, "/v1/users/a/b/c/d").err(),
            Some(false)
        );
        assert!(find_path(Method::POST, "/v1/users/a/sessions/s:explode").is_err());
    }
}
