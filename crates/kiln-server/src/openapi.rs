//! `GET /v1/openapi.json`: the routes, with request and response bodies described by schemas
//! generated from the types the handlers (de)serialise, so the document cannot drift from them.

use kiln_core::jobs::queue::QueuedJob;
use kiln_core::jobs::{JobEvent, JobSpec};
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

/// The document.
pub fn document() -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    let job_spec = generator.subschema_for::<JobSpec>();
    let job = generator.subschema_for::<QueuedJob>();
    let event = generator.subschema_for::<JobEvent>();
    let generation = generator.subschema_for::<crate::openai::GenerationRequest>();
    let schemas: Map<String, Value> =
        generator.definitions().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let body = |schema: &schemars::Schema| json!({ "required": true, "content": { "application/json": { "schema": schema } } });
    let ok = |what: &str| json!({ "200": { "description": what } });
    let returns = |what: &str, schema: &schemars::Schema| json!({ "200": { "description": what, "content": { "application/json": { "schema": schema } } } });
    let mut paths = Map::new();
    let mut add = |path: &str, method: &str, op: Value| {
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[method] = op;
    };
    add(
        "/healthz",
        "get",
        json!({ "summary": "200 once requests are accepted", "security": [], "responses": ok("ok") }),
    );
    add(
        "/v1/jobs",
        "post",
        json!({ "summary": "queue any job", "requestBody": body(&job_spec),
                "responses": { "202": { "description": "queued", "content": { "application/json": { "schema": job } } } } }),
    );
    add(
        "/v1/jobs",
        "get",
        json!({ "summary": "running, queued and recent jobs", "responses": ok("{jobs: [job]}") }),
    );
    add("/v1/jobs/{id}", "get", json!({ "summary": "one job", "responses": returns("the job", &job) }));
    add(
        "/v1/jobs/{id}",
        "delete",
        json!({ "summary": "cancel a job", "responses": ok("{id, state, cancel_requested}") }),
    );
    add(
        "/v1/jobs/{id}/events",
        "get",
        json!({ "summary": "server-sent events until the job ends", "responses": { "200": { "description": "text/event-stream of events",
                 "content": { "text/event-stream": { "schema": event } } } } }),
    );
    for (p, s) in [
        ("/v1/assets", "the library's assets (?kind=&tier=&limit=)"),
        ("/v1/assets/{id}", "one asset with its record and its library job (device seconds)"),
        ("/v1/assets/{id}/image", "the asset's file"),
        ("/v1/assets/{id}/lineage", "parents and children"),
        ("/v1/me", "the key's owner name and daily quota"),
        ("/v1/report", "costs and loaded models"),
        ("/v1/workers", "the queue workers: device, state, current job, jobs done, last heartbeat"),
        ("/v1/tiers", "the tiers"),
        ("/v1/presets", "the presets (brand kits) with their hashes"),
        ("/v1/loras", "the LoRA library: names, hashes and what each file says about itself"),
        ("/v1/models", "OpenAI: the diffusion tiers"),
        ("/sdapi/v1/progress", "A1111: progress of the running job"),
        ("/sdapi/v1/options", "A1111: sd_model_checkpoint"),
        ("/sdapi/v1/sd-models", "A1111: the diffusion tiers"),
        ("/sdapi/v1/samplers", "A1111: samplers"),
        ("/sdapi/v1/schedulers", "A1111: schedules"),
        ("/sdapi/v1/upscalers", "A1111: the upscale tiers"),
        ("/sdapi/v1/prompt-styles", "A1111: prompt styles (the project's presets)"),
        ("/sdapi/v1/loras", "A1111: the LoRA library"),
    ] {
        add(p, "get", json!({ "summary": s, "responses": ok(s) }));
    }
    add(
        "/v1/images/generations",
        "post",
        json!({ "summary": "OpenAI Images: generate", "requestBody": body(&generation), "responses": ok("{created, data: [{b64_json}]}") }),
    );
    add(
        "/v1/images/edits",
        "post",
        json!({ "summary": "OpenAI Images: edit (multipart image, mask, prompt)", "responses": ok("{created, data}") }),
    );
    add(
        "/v1/uploads",
        "post",
        json!({ "summary": "store an image (the body: PNG, JPEG or WebP) for a spec's {upload: sha256}",
                "requestBody": { "required": true, "content": { "image/png": {}, "image/jpeg": {}, "image/webp": {} } },
                "responses": { "201": { "description": "{upload, width, height}" } } }),
    );
    for (p, s) in [
        ("/sdapi/v1/txt2img", "A1111 txt2img"),
        ("/sdapi/v1/img2img", "A1111 img2img / inpaint"),
        ("/sdapi/v1/interrupt", "A1111: cancel the running job"),
        ("/sdapi/v1/extra-single-image", "A1111: upscale an image with an upscale tier"),
        ("/sdapi/v1/options", "A1111: set sd_model_checkpoint"),
    ] {
        add(p, "post", json!({ "summary": s, "responses": ok(s) }));
    }
    json!({
        "openapi": "3.0.3",
        "info": { "title": "kiln", "version": kiln_core::VERSION },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer" },
                "basic": { "type": "http", "scheme": "basic" },
            },
        },
        "security": [{ "bearer": [] }, { "basic": [] }],
        "paths": paths,
    })
}
