"""Validated configuration for the whole Consilium graph: specialists, router, merger and server."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

# Hard ceilings that no config may exceed: a config may lower them, never raise them.
MAX_NEW_TOKENS_CEILING = 32_768
MAX_PROMPT_TOKENS_CEILING = 1_048_576
MAX_IMAGE_PIXELS_CEILING = 100_000_000  # width x height; Pillow's own bomb guard is set to this (deployments/images.py)
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
RESERVED_MODEL_NAMES = frozenset({"auto"})


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field path and the bad value."""


class _Strict(BaseModel):
    # Unknown keys are typos more often than not: reject them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class GenerationDefaults(_Strict):
    """Sampling defaults a specialist uses when the request does not say otherwise."""

    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Softmax temperature; 0 means greedy.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS_CEILING, description="Default cap on generated tokens.")
    max_new_tokens_limit: int = Field(
        2048, ge=1, le=MAX_NEW_TOKENS_CEILING, description="Largest max_tokens a client may ask for."
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> GenerationDefaults:
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} exceeds max_new_tokens_limit={self.max_new_tokens_limit}"
            )
        return self


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling bounds for one deployment."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float | None = Field(
        None, ge=0, le=3600, description="Load must stay high this long before replicas are added; None: Ray's 30."
    )
    downscale_delay_s: float | None = Field(
        None, ge=0, le=3600, description="Load must stay low this long before replicas go; None: Ray's 600."
    )
    look_back_period_s: float | None = Field(
        None, gt=0, le=3600, description="Window the ongoing-request average is taken over; None: Ray's 30."
    )
    metrics_interval_s: float | None = Field(
        None, gt=0, le=600, description="How often replicas and handles report load; None: Ray's 10."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        if self.look_back_period_s is not None and self.look_back_period_s <= (self.metrics_interval_s or 10.0):
            raise ValueError(
                f"look_back_period_s={self.look_back_period_s} must exceed metrics_interval_s="
                f"{self.metrics_interval_s or 10.0} (Ray's default is 10)"
            )
        return self


class DeploymentOptions(_Strict):
    """Resources and scaling of one Ray Serve deployment."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica; 1 on a GPU node.")
    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count (exclusive with autoscaling).")
    autoscaling: AutoscalingConfig | None = Field(None, description="Autoscaling bounds.")
    max_ongoing_requests: int = Field(32, ge=1, le=65_536, description="Concurrent requests one replica accepts.")
    max_queued_requests: int = Field(
        128,
        ge=1,
        le=1_000_000,
        description="Requests each caller queues for this deployment past max_ongoing_requests; more get 503.",
    )
    retry_after_s: float = Field(1.0, ge=0, le=3600, description="Retry-After sent with a 503 for a full queue.")
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="At most this many replicas of the deployment per node (spreads across nodes)."
    )
    graceful_shutdown_timeout_s: float | None = Field(
        None,
        ge=0,
        le=3600,
        description="How long a stopping replica (scale-down, redeploy, shutdown) waits for its requests in "
        "flight before it is killed; None: Serve's default (20 s), which cuts off longer streams.",
    )
    max_batch_size: int = Field(8, ge=1, le=1024, description="Dynamic batch size (@serve.batch, merger only).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10, description="How long a batch waits to fill.")

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        return self

    def replica_ceiling(self) -> int:
        """The most replicas this deployment may run: max_replicas with autoscaling, else num_replicas."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else (self.num_replicas or 1)

    def serve_options(self, queue_slack: int = 0) -> dict[str, Any]:
        """The keyword arguments for `Deployment.options(...)`; Ray's queue bound raised by queue_slack."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            # Ray's default queue is unbounded: bound it so overload is refused at once, not queued for minutes.
            "max_queued_requests": self.max_queued_requests + queue_slack,
            "backpressure_config": {"retry_after_s": self.retry_after_s},
        }
        if self.max_replicas_per_node is not None:
            opts["max_replicas_per_node"] = self.max_replicas_per_node
        if self.graceful_shutdown_timeout_s is not None:
            opts["graceful_shutdown_timeout_s"] = self.graceful_shutdown_timeout_s
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


Backend = Literal["auto", "hf", "vllm"]
Modality = Literal["text", "image"]
Quantization = Literal["none", "nf4", "int8"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class EngineConfig(_Strict):
    """What it takes to load one base model: the part that specialists sharing a base must agree on."""

    model: str = Field(..., min_length=1, description="Local checkpoint directory or hub id.")
    backend: Backend = Field("auto", description="vllm where supported, hf otherwise, or forced.")
    quantization: Quantization = Field("none", description="bitsandbytes quantization (hf backend).")
    dtype: DType = Field("auto", description="Weights dtype; auto picks bf16 on GPU, fp32 on CPU.")
    device: str | None = Field(None, description="torch device; None picks what is present.")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters: name -> peft dir.")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's.")
    trust_remote_code: bool = Field(False, description="Run model code from the checkpoint (unsafe).")
    max_prompt_tokens: int = Field(
        4096, ge=1, le=MAX_PROMPT_TOKENS_CEILING, description="Longest prompt accepted, in tokens."
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed through to vLLM's AsyncEngineArgs.")
    max_num_seqs: int = Field(
        64, ge=1, le=1024, description="Most requests decoded together in one step (the engine's running batch)."
    )
    # Part of the base model, not of one specialist: a group shares one loaded model, so its members
    # must agree (the group check compares every engine field), and the engine loads an
    # image-text-to-text model (AutoModelForImageTextToText + AutoProcessor) when "image" is here.
    modalities: list[Modality] = Field(
        default_factory=lambda: ["text"],
        description="Inputs the model accepts: [text] or [text, image]; requests with images go to [text, image].",
    )

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: list[str]) -> list[str]:
        if "text" not in v:
            raise ValueError(f"modalities must include 'text' (every specialist answers in text), got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"modalities has duplicates: {v}")
        return v

    @property
    def accepts_images(self) -> bool:
        return "image" in self.modalities

    stream_interval_s: float = Field(
        0.0,
        ge=0,
        le=1,
        description="HF engine streams: after the first delta, at most one delta per this interval (the tokens "
        "in between merged); fewer chunks through Serve and HTTP per stream. 0: every token at once.",
    )
    stream_deltas_per_s: float | None = Field(
        None,
        gt=0,
        le=100000,
        description="HF engine: a budget of stream deltas per second for the whole replica; with n rows streaming, "
        "each stream's interval is at least n / this (at most 1 s; the first delta still at once), so the chunks "
        "through Serve and HTTP stay bounded however many streams run. None: no budget (stream_interval_s alone).",
    )
    decode_thread_priority: Literal["normal", "idle"] = Field(
        "normal",
        description="HF engine on CPU: 'idle' runs the decoding thread (and the torch/OpenMP threads it starts) "
        "under Linux SCHED_IDLE, so the replica's event loop, the router and Serve's proxy (refusals, stream "
        "chunks) run before it whenever they want a core; decoding uses what is left. 'normal': as any thread. "
        "Not nice levels: Ray starts its workers at niceness 15 already, leaving a nice value little room.",
    )

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"adapter name {name!r} must match {NAME_PATTERN}")
        return v


class SpecialistConfig(EngineConfig):
    """One domain specialist: a base model (maybe shared), an optional adapter and its defaults."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Specialist name; clients pin it as `model`.")
    adapter: str | None = Field(None, description="Adapter (a key of `adapters`) this specialist uses.")
    group: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="Specialists in one group share a deployment and one loaded base model.",
    )
    system_prompt: str | None = Field(None, max_length=8192, description="Prepended to every chat.")
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Per-request timeout when fanned out.")
    ttft_timeout_s: float = Field(30.0, gt=0, le=3600, description="Streams: longest wait for the first token.")
    stall_timeout_s: float = Field(10.0, gt=0, le=3600, description="Streams: longest wait between two tokens.")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in RESERVED_MODEL_NAMES:
            raise ValueError(f"name {v!r} is reserved")
        return v

    @model_validator(mode="after")
    def _adapter_known(self) -> SpecialistConfig:
        if self.adapter is not None and self.adapter not in self.adapters:
            raise ValueError(f"adapter {self.adapter!r} is not one of adapters {sorted(self.adapters)}")
        return self

    def engine_config(self) -> EngineConfig:
        """The base-model part of this specialist."""
        return EngineConfig(**{k: getattr(self, k) for k in EngineConfig.model_fields})


class RouterConfig(_Strict):
    """The "tiny ada" domain classifier and the policy that turns its scores into specialists."""

    model: str | None = Field(None, description="Router artifact directory; None uses the shipped one.")
    top_k: int = Field(2, ge=1, le=16, description="At most this many specialists answer one prompt.")
    fallback: str = Field(..., pattern=NAME_PATTERN, description="Specialist used when no domain scores.")
    thresholds: dict[str, float] = Field(default_factory=dict, description="Per-domain threshold overrides (0..1).")
    domain_to_specialist: dict[str, str] = Field(
        default_factory=dict, description="Router domain -> specialist name; identity when absent."
    )
    image_domain_threshold: float | None = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="Requests with images: a text-only specialist whose domain scores at least this on the text "
        "also answers (from the text alone) and the merger combines it with the image-capable answer; "
        "None: image requests get the image-capable specialists only. See docs/vision.md.",
    )

    @field_validator("thresholds")
    @classmethod
    def _thresholds_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for domain, t in v.items():
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold for {domain!r} is {t}, must be within [0, 1]")
        return v


class MergerConfig(_Strict):
    """The merger: `fusion` (T5 encoder per answer, cross-attention merger, T5 decoder) or `aggregate`
    (a causal LM writes one answer from the question and the experts' answers)."""

    synthesis: Literal["fusion", "aggregate"] = Field(
        "fusion", description="fusion: T5 + cross-attention merger; aggregate: a causal LM with a merge prompt."
    )
    model: str = Field(..., min_length=1, description="T5 checkpoint (fusion) or causal LM checkpoint (aggregate).")
    aggregate_prompt: str | None = Field(
        None, max_length=8192, description="Instruction ending the aggregate prompt; None uses the built-in one."
    )
    merger_weights: str | None = Field(None, description="Trained merger directory; None = identity merger.")
    depth_layers: int = Field(
        0,
        ge=0,
        le=129,
        description="Untrained merger only: mix the last N encoder hidden states (DCA-style); 0 = last layer. "
        "A trained merger directory carries its own setting.",
    )
    sliding_window: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Fusion merger: each answer token attends to positions within +-W of the other answers "
        "(long answers); None = all. Parameter-free, so it applies to a trained merger too.",
    )
    device: str | None = Field(None, description="torch device; None picks what is present.")
    dtype: DType = Field("auto")
    max_answer_tokens: int = Field(256, ge=8, le=4096, description="Per-answer token budget (truncates).")
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS_CEILING)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    timeout_s: float = Field(120.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _mode_fields(self) -> MergerConfig:
        if self.synthesis == "aggregate" and self.merger_weights is not None:
            raise ValueError("merger_weights belongs to synthesis 'fusion'; synthesis 'aggregate' has no merger module")
        if self.synthesis == "aggregate" and self.sliding_window is not None:
            raise ValueError("sliding_window belongs to synthesis 'fusion'; synthesis 'aggregate' has no merger module")
        return self

    @field_validator("depth_layers")
    @classmethod
    def _depth_layers(cls, v: int) -> int:
        if v == 1:  # one state is the last layer: nothing to mix
            raise ValueError("depth_layers must be 0 (off) or >= 2 encoder hidden states, got 1")
        return v


ImageFormat = Literal["PNG", "JPEG", "WEBP"]
HOST_PATTERN = r"^(\*\.)?[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?$|^\[[0-9a-f:.]+\](:[0-9]{1,5})?$"


class RemoteImageConfig(_Strict):
    """Fetching `http(s)` image URLs at the ingress: off unless enabled, and then only from listed hosts."""

    enabled: bool = Field(False, description="Fetch http(s) image URLs at all; off: only data: URLs are accepted.")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts images may come from: 'host' (any port), 'host:port', or '*.example.com' "
        "(subdomains only). Matched on the URL's host, lower case; no bare '*'.",
    )
    schemes: list[Literal["http", "https"]] = Field(
        default_factory=lambda: ["https"], min_length=1, description="URL schemes fetched (https by default)."
    )
    timeout_s: float = Field(5.0, gt=0, le=60, description="The whole fetch (connect, headers, body) must end by this.")

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        out = []
        for h in v:
            host = h.strip().lower()
            if not re.match(HOST_PATTERN, host):
                raise ValueError(f"allowed host {h!r} must be a host name, 'host:port' or '*.domain' (no bare '*')")
            out.append(host)
        return out

    @model_validator(mode="after")
    def _hosts_when_enabled(self) -> RemoteImageConfig:
        if self.enabled and not self.allowed_hosts:
            raise ValueError("enabled is true but allowed_hosts is empty: name the hosts images may come from")
        return self


class ImageConfig(_Strict):
    """Bounds on the images a request may carry; nothing is decoded past them."""

    max_images: int = Field(4, ge=1, le=64, description="Most images in one request (all messages).")
    max_image_bytes: int = Field(
        5 * 1_048_576, ge=1024, le=64 * 1_048_576, description="Largest encoded image (decoded base64 or fetched)."
    )
    max_pixels: int = Field(
        16_777_216,
        ge=1,
        le=MAX_IMAGE_PIXELS_CEILING,
        description="Largest width x height, checked from the header before any pixel is decoded "
        "(decompression bombs); Pillow's own guard sits at the ceiling behind it.",
    )
    formats: list[ImageFormat] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP"],
        min_length=1,
        description="Formats decoded; Pillow opens nothing else (no other decoder runs on client bytes).",
    )
    remote: RemoteImageConfig = Field(default_factory=RemoteImageConfig)


class ServerConfig(_Strict):
    """HTTP limits and auth of the router ingress."""

    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the bearer token (read by the router replica); "
        "auth is off when neither this nor api_key_file is set.",
    )
    api_key_file: str | None = Field(
        None, min_length=1, description="File holding the bearer token (a mounted secret)."
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576, description="Largest request body.")
    max_prompt_chars: int = Field(200_000, ge=1, description="Largest prompt (all messages) in characters.")
    max_messages: int = Field(256, ge=1, le=10_000)
    request_timeout_s: float = Field(300.0, gt=0, le=3600, description="Deadline of a whole request, streams too.")
    images: ImageConfig = Field(default_factory=ImageConfig, description="Image inputs: limits and remote URLs.")
    max_inflight_requests: int | None = Field(
        None,
        ge=1,
        le=65_536,
        description="Completions one ingress replica works on at once; more get 503 + Retry-After before any "
        "parsing or routing. None: what the specialists can hold (their max_ongoing + max_queued per replica), "
        "kept below server.deployment.max_ongoing_requests.",
    )
    retry_after_spread: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Each overload 503's Retry-After is drawn in whole seconds in [r, r x (1 + spread)] (r: the "
        "refusing bound's retry_after_s), so refused clients do not all come back in the same second. 0: r.",
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @model_validator(mode="after")
    def _bound_below_proxy(self) -> ServerConfig:
        # At max_ongoing_requests Serve's proxy stops sending and queues, then refuses with its own
        # plain-text 503: the ingress's OpenAI-shaped refusal must fire before that.
        if (
            self.max_inflight_requests is not None
            and self.max_inflight_requests >= self.deployment.max_ongoing_requests
        ):
            raise ValueError(
                f"max_inflight_requests={self.max_inflight_requests} must be below "
                f"deployment.max_ongoing_requests={self.deployment.max_ongoing_requests}"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_plain_key(cls, data: Any) -> Any:
        # The application args are readable by anyone who can read the Serve config or the dashboard.
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(
                "api_key must not be written into the config (it is readable in the Serve application args); "
                "name an environment variable in server.api_key_env or a secret file in server.api_key_file"
            )
        return data

    def read_api_key(self) -> SecretStr | None:
        """The bearer token from the environment or the secret file; None when auth is off."""
        if self.api_key_env is None and self.api_key_file is None:
            return None
        if self.api_key_env is not None:
            key, where = os.environ.get(self.api_key_env), f"environment variable {self.api_key_env}"
            if key is None:
                raise ConfigError(f"server.api_key_env: {where} is not set")
        else:
            path = Path(self.api_key_file).expanduser()  # type: ignore[arg-type]
            where = f"file {str(path)!r}"
            try:
                key = path.read_text()
            except OSError as err:
                raise ConfigError(f"server.api_key_file: cannot read {where}: {err.strerror}") from None
        key = key.strip()
        if len(key) < 8:
            raise ConfigError(f"server.api_key: the key in {where} is shorter than 8 characters")
        return SecretStr(key)


class GraphConfig(_Strict):
    """The whole service: what `build_app` receives."""

    specialists: list[SpecialistConfig] = Field(..., min_length=1)
    router: RouterConfig
    merger: MergerConfig
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _consistent(self) -> GraphConfig:
        names = [s.name for s in self.specialists]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate specialist names: {dupes}")
        if self.router.fallback not in names:
            raise ValueError(f"router.fallback {self.router.fallback!r} is not a specialist ({names})")
        for domain, spec in self.router.domain_to_specialist.items():
            if spec not in names:
                raise ValueError(f"router.domain_to_specialist[{domain!r}] = {spec!r} is not a specialist")
        for group, members in self.groups().items():
            base = members[0].engine_config()
            for other in members[1:]:
                # Adapters may differ per member: the group loads the union.
                a = base.model_dump(exclude={"adapters"})
                b = other.engine_config().model_dump(exclude={"adapters"})
                diff = sorted(k for k in a if a[k] != b[k])
                if diff:
                    raise ValueError(
                        f"specialists {members[0].name!r} and {other.name!r} share group {group!r} but differ in {diff}"
                    )
        return self

    def groups(self) -> dict[str, list[SpecialistConfig]]:
        """Deployment name -> specialists served by it (a lone specialist is its own group)."""
        out: dict[str, list[SpecialistConfig]] = {}
        for s in self.specialists:
            out.setdefault(s.group or s.name, []).append(s)
        return out

    def _ingress_replicas(self) -> int:
        ingress = self.server.deployment
        n = ingress.autoscaling.min_replicas if ingress.autoscaling is not None else ingress.num_replicas
        return max(1, n or 1)

    def specialist_capacity(self) -> dict[str, int]:
        """Specialist deployment -> requests one ingress replica may have in flight to it at once: its
        (max_ongoing_requests + max_queued_requests) x replicas, divided over the ingress replicas (the proxy
        spreads requests over them). With autoscaling, max_replicas: a bound at today's replica count would
        refuse the very load the autoscaler needs to see to add replicas; while fewer run, Ray's own queue
        bound (the backstop) refuses the excess."""
        out = {}
        for group, members in self.groups().items():
            d = members[0].deployment
            slots = (d.max_ongoing_requests + d.max_queued_requests) * d.replica_ceiling()
            out[group] = -(-slots // self._ingress_replicas())
        return out

    def ingress_bound(self) -> int:
        """Completions one ingress replica admits at once (`server.max_inflight_requests`, or derived)."""
        if self.server.max_inflight_requests is not None:
            return self.server.max_inflight_requests
        per_replica = sum(self.specialist_capacity().values())
        ingress = self.server.deployment
        below_proxy = ingress.max_ongoing_requests - max(1, ingress.max_ongoing_requests // 8)  # room for /health
        return max(1, min(per_replica, below_proxy))

    def specialist(self, name: str) -> SpecialistConfig:
        for s in self.specialists:
            if s.name == name:
                return s
        raise KeyError(name)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        lines.append(f"  {path}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def parse_graph_config(data: Any, source: str = "<dict>") -> GraphConfig:
    """Validate a mapping as a GraphConfig; raise ConfigError naming each bad field and value."""
    if isinstance(data, dict) and "applications" in data:
        data = _app_args(data, source)
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping, got {type(data).__name__}")
    try:
        return GraphConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def _app_args(serve_file: dict[str, Any], source: str) -> Any:
    # A Ray Serve config file: our graph config is the `args` of its (first) application.
    apps = serve_file.get("applications") or []
    if not apps or not isinstance(apps[0], dict) or "args" not in apps[0]:
        raise ConfigError(f"invalid config {source}: applications[0].args is missing")
    return apps[0]["args"]


def load_graph_config(path: str | Path) -> GraphConfig:
    """Read a YAML file (our graph config, or a Serve config whose first app's args are one)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid config {p}: not valid YAML: {err}") from None
    return parse_graph_config(data, source=str(p))
