"""Gateway settings: one object, read from ``MAGNET_*`` environment variables and CLI flags."""

from __future__ import annotations

import re

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO_ROOT / "models" / "mnist"


class Settings(BaseSettings):
    """Everything the gateway can be told. Each field is also ``MAGNET_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MAGNET_", extra="forbid")

    bundle: Path = Field(DEFAULT_BUNDLE, description="Bundle directory (manifest.json + ONNX files) to serve.")
    upstream: str | None = Field(
        None, description="Base URL of the classifier's model server (e.g. http://triton:8000). "
                          "Unset: the bundle's own classifier runs in-process (the embedded default).")
    upstream_protocol: Literal["v2", "tfserving", "v1"] = Field(
        "v2", description="Protocol the upstream speaks: 'v2' is the Open Inference Protocol "
                          "(Triton, KServe, MLServer); 'tfserving' is TensorFlow Serving's REST predict API, and "
                          "'v1' the same for KServe's v1 protocol, which is that API.")
    # The upstream classifier's input contract: unset fields take the bundle manifest's
    # ``classifier.input`` / ``output`` / ``output_name`` (whose defaults are NCHW, [0, 1], input
    # "input", logits, first output); the gateway logs which applies at start. Without
    # MAGNET_UPSTREAM the embedded classifier always uses the manifest's.
    upstream_layout: Literal["NCHW", "NHWC"] | None = Field(
        None, description="Tensor layout the upstream model server takes (any case): the gateway transposes "
                          "its N x C x H x W batches to 'NHWC' for models that want channels last (most TF models).")
    upstream_scale: float | None = Field(None, gt=0, description="Multiply [0, 1] pixels by this (255: 0..255).")
    upstream_mean: tuple[float, ...] | None = Field(None, description="Per-channel mean subtracted after scaling.")
    upstream_std: tuple[float, ...] | None = Field(None, description="Per-channel std divided after the mean.")
    model_name: str | None = Field(
        None, description="Name the v2 front serves (/v2/models/<name>/infer); default: the bundle's. As a KServe "
        "transformer, the InferenceService's name (KServe passes it as --model_name).")
    upstream_model: str | None = Field(
        None, description="Model name on the upstream server; defaults to the bundle's name.")
    upstream_input: str | None = Field(None, description="Name of the upstream model's input tensor.")
    upstream_output: str | None = Field(
        None, description="Name of the upstream output tensor to read; unset: the first output.")
    upstream_outputs: Literal["logits", "probabilities"] | None = Field(
        None, description="Whether the upstream returns logits or probabilities (softmax outputs).")
    upstream_binary: bool | None = Field(
        None, description="OIP v2 upstream: true sends the input and asks for the outputs as binary data (the "
        "binary data extension; Triton, KServe >= 0.11); false never does, FP16 included (MLServer, which has no "
        "binary data extension, takes FP16 as JSON; Triton and KServe refuse it). Unset: JSON, except an FP16 "
        "input or output, which goes as binary data unless the server's metadata (GET /v2) names MLServer.")
    upstream_timeout_s: float = Field(10.0, gt=0, description="Total timeout of one upstream call, seconds.")
    upstream_max_response_bytes: int = Field(
        32 * 2**20, ge=1024, description="Largest upstream answer read; a larger one is dropped unread and "
        "answered 502.")
    upstream_max_connections: int = Field(64, ge=1, description="Size of the keep-alive connection pool.")
    upstream_datatype: Literal["FP32", "FP16", "FP64", "UINT8"] | None = Field(
        None, description="Datatype of the upstream model's input: FP32, FP16 or FP64 (the values cast), or UINT8 "
        "(8-bit pixels, rounded; needs MAGNET_UPSTREAM_SCALE=255 and no mean/std), as models with their own "
        "preprocessing often take. Unset: what the model's metadata says (OIP v2, or TF Serving's signature), "
        "asked once at the first call. An OIP v2 FP16 input goes as binary data, and an FP16 output (from the "
        "metadata) is asked as binary data (Triton and KServe refuse FP16 in JSON), unless the server is MLServer "
        "or MAGNET_UPSTREAM_BINARY=false (see there).")
    upstream_max_batch: int = Field(
        0, ge=0, description="Most rows per upstream call: a larger batch goes as several calls at once, its "
        "answers joined in order (a model server that caps its batch, as Triton's max_batch_size does). 0: from "
        "an OIP v2 server, once: a model whose input has a fixed batch size (its metadata's first dimension, "
        "e.g. an export without dynamic axes) gets exactly that many rows per call, the last call padded; "
        "Triton's max_batch_size (its model config) caps the rest; TF Serving: a fixed first dimension in the "
        "model's signature; otherwise no limit.")
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where onnxruntime runs the autoencoders (and the embedded classifier): "
                            "'auto' uses CUDA when the CUDA provider is installed.")
    ort_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per model; 0 = each worker's share "
                             "of the usable cores less one (the event loop's), at least 1.")
    ort_spinning: bool = Field(True, description="Let onnxruntime's idle intra-op threads busy-wait for the next "
                               "call: lower latency on cores of their own, cycles taken from a model server or "
                               "other workers on shared cores.")
    ort_optimization: Literal["auto", "all", "extended", "basic"] = Field(
        "auto", description="onnxruntime's graph optimization level per model: 'auto' times 'all' against 'extended' "
                            "(no CPU layout transformations) on the CPU when a model loads and keeps the faster "
                            "(the MNIST autoencoders run 1.45-2x faster without them, the CIFAR-10 reformer "
                            "1.6x slower); 'all' on a GPU.")
    fused: Literal["auto", "on", "off"] = Field(
        "auto", description="One onnxruntime graph per pool member (its autoencoders, the reformed output and, "
                            "embedded, the classifier): 'auto' on CUDA when the onnx package is installed (the "
                            "gpu extra), 'on' requires it, 'off' keeps a session per model.")
    workers: int = Field(0, ge=0, description="Gateway processes on one port (0: one per core with the embedded "
                         "classifier, one per two cores in front of a model server; at most 8). "
                         "They share the session secret and their metrics; a worker that dies is replaced.")
    inference_threads: int = Field(4, ge=1, description="Worker threads that run onnxruntime off the event loop.")
    mode: Literal["enforce", "shadow"] = Field(
        "enforce", description="'enforce' rejects what the detectors flag and reforms the rest; 'shadow' scores "
                               "and counts everything (the same metrics) but rejects nothing and sends every input "
                               "upstream as it came: the way to try the defense on live traffic first.")
    explain: bool = Field(
        False, description="Add detector scores and the detectors that fired to each result. Scores help "
                           "an attacker: leave off in production.")
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="Largest request head (request line and "
                                  "headers); larger: 431 and the connection closed.")
    header_timeout_s: float = Field(10.0, gt=0, description="Seconds a client has to send a request's head, "
                                    "from the connection or from a later request's first byte; then it is closed.")
    body_timeout_s: float = Field(30.0, gt=0, description="Seconds a client has to send a request's body "
                                  "once its head is in (408 after).")
    shutdown_timeout_s: float = Field(20.0, gt=0, description="On SIGTERM, seconds granted to requests in "
                                      "flight before their connections are closed.")
    max_in_flight: int = Field(128, ge=1, description="Most API requests a worker works on at once; more get "
                               "503 with Retry-After at once, instead of queueing without bound.")
    cors_origins: tuple[str, ...] | None = Field(
        None, description="Origins allowed to call the API from a browser (CORS), as a JSON list; unset: none "
        "(no CORS headers, so a web page cannot read the answers).")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above).")
    max_batch: int = Field(256, ge=1, description="Most inputs accepted in one request (413 above).")
    batch_rows: int = Field(256, ge=0, description="Micro-batching: concurrent requests of one pool member are "
                            "coalesced into one defense pass and one upstream call of up to this many rows "
                            "(0: off, each request alone).")
    batch_window_ms: float = Field(0.0, ge=0, description="Micro-batching: wait this long before a batch starts, "
                                   "to gather more requests (0: batch what is queued, no waiting).")
    speculate: Literal["auto", "on", "off"] = Field(
        "off", description="Speculative forwarding: send the reformed rows to the model server as soon as the "
                           "reformer has run and score the detectors while it works (lower latency when the model "
                           "server has cores of its own; the same verdicts and answers). The model server then also "
                           "classifies rows that end up rejected; their answers are dropped. 'off' (the default): "
                           "rejected rows never reach the model server; 'auto': in front of a model server, while "
                           "at most max(5 %, twice the bundle's calibrated clean rejection) of the recent rows were "
                           "rejected; 'on': the same with any upstream.")
    log_level: str = Field("info", description="Log level of the gateway and uvicorn.")
    operator_port: int = Field(
        8002, ge=0, le=65535, description="Port of the operator endpoints (/metrics, and /docs and /openapi.json "
        "when docs are on), on the same interface as the API unless MAGNET_OPERATOR_HOST says otherwise. "
        "The API port answers 404 for them. Equal to MAGNET_PORT: everything on one port (not for production).")
    operator_host: str | None = Field(None, description="Interface of the operator port (default: MAGNET_HOST).")
    docs: bool = Field(False, description="Serve the OpenAPI schema and Swagger UI (/docs, /openapi.json) "
                       "on the operator port.")
    api_keys: SecretStr | None = Field(
        None, description="API keys as 'id:key,id:key' (keys of 16 characters or more). Clients send "
        "'Authorization: Bearer <key>' or 'X-API-Key: <key>'; without a valid one they get 401. Health "
        "probes stay open. Unset (and no key file): the gateway runs open, with a warning at start.")
    api_key_file: Path | None = Field(None, description="File of API keys, one 'id:key' per line (# comments); "
                                      "added to MAGNET_API_KEYS.")
    member_by: Literal["auto", "key", "session"] = Field(
        "auto", description="What a pool member is bound to: 'key', the caller's API key id (clients cannot "
        "choose their member); 'session', the session id the client sends (any client can pick sessions, "
        "so it can probe which member it gets: opt-in only); 'auto': 'key' when API keys are configured, "
        "else 'session'.")
    probabilities: Literal["auto", "on", "off"] = Field(
        "auto", description="Return the classifier's probabilities with each label. They fingerprint a pool's "
        "member, so 'auto' returns them for single-member bundles only.")
    rejection_limit: str = Field(
        "200/60", description="'R/W': a caller with R rejected inputs within W seconds is throttled (429 with "
        "Retry-After) until the window has room again. Counted per caller (API key id, else client address) "
        "in each worker process. '0' turns it off.")
    rate_limit: str = Field(
        "0", description="'N/W': at most N requests per caller in any W seconds, per worker process (429 with "
        "Retry-After above). '0' (default) turns it off.")
    session_secret: SecretStr | None = Field(
        None, description="Secret (at least 16 characters) that maps session ids to pool members; give "
                          "every replica the same one. Unset: a random one per process, so replicas disagree.")
    session_secret_file: Path | None = Field(
        None, description="File holding the session secret (a mounted Secret), read at start when "
        "MAGNET_SESSION_SECRET is unset.")
    session_header: str = Field("X-Session-ID", description="Request header that carries the session id.")
    session_cookie: str = Field(
        "magnet_session", description="Cookie that carries the session id when the header is absent; "
                                      "the gateway sets it on responses to requests that had neither.")

    @model_validator(mode="after")
    def _secret_from_file(self) -> "Settings":
        if self.session_secret is None and self.session_secret_file is not None:
            try:
                text = Path(self.session_secret_file).read_text().strip()
            except OSError as e:
                raise ValueError(f"MAGNET_SESSION_SECRET_FILE {self.session_secret_file}: {e.strerror}") from e
            self.session_secret = SecretStr(text)
        return self

    @field_validator("session_cookie")
    @classmethod
    def _cookie_name(cls, value: str) -> str:
        """A cookie name is an HTTP token (RFC 6265): letters, digits and ``!#$%&'*+-.^_`|~``."""
        if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", value):
            raise ValueError(f"{value!r} is not a cookie name (an HTTP token: no spaces, ';', '=' or quotes)")
        return value

    @field_validator("rejection_limit", "rate_limit")
    @classmethod
    def _window(cls, value: str) -> str:
        """'0' or 'N/W' with N a positive integer and W positive seconds."""
        if value.strip() == "0":
            return "0"
        count, _, seconds = value.partition("/")
        try:
            if int(count) > 0 and float(seconds) > 0:
                return value.strip()
        except ValueError:
            pass
        raise ValueError(f"{value!r}: expected '0' (off) or 'N/W', e.g. '200/60' for 200 in 60 seconds")

    def window(self, name: str) -> tuple[int, float] | None:
        """``rejection_limit`` or ``rate_limit`` as (count, seconds), None when off."""
        value = getattr(self, name)
        if value == "0":
            return None
        count, seconds = value.split("/")
        return int(count), float(seconds)

    @field_validator("mode", "upstream_layout", "upstream_datatype", mode="before")
    @classmethod
    def _any_case(cls, value: object, info) -> object:
        """Case-insensitive vocabularies: 'SHADOW' is 'shadow', 'nhwc' is 'NHWC', 'uint8' is 'UINT8'."""
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name in ("upstream_layout", "upstream_datatype") else value.lower()
