"""Torch-free types at the engine/server boundary: requests, sampling parameters, outputs, stats.

Longer than ~300 lines on purpose: the one engine module the server imports (docs/architecture.md),
so every type crossing the boundary lives here, together.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "abort", "error"]
# JSON under a grammar is spaced as models write it (`{"a": 1, "b": 2}`): a fixed spacing also
# keeps a small model from filling its budget with optional whitespace.
MAX_LOGPROBS = 20  # the most alternatives a request may ask for per token (OpenAI's cap)
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class InvalidRequestError(ValueError):
    """A request the client can fix (HTTP 400): the only engine error the server blames on them.

    `param` names the request field at fault when the engine knows it (e.g. "messages",
    "response_format"). Template and grammar errors derive from it. Any other exception raised
    while serving a request is hearth's bug: a 500 with a logged traceback.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; the client should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served (HTTP 503)."""


@dataclass(frozen=True)
class ThinkBlock:
    """A reasoning block before the answer (thinking models): a Grammar with one applies only
    after the block closes, and a budget closes it (engine/constrained/grammar.py composes the
    two)."""

    opened: bool  # the prompt left the block open (the template); else the model may open it
    max_tokens: int | None = None  # reasoning budget: once spent, the closing tag is forced
    start: str = "<think>"
    end: str = "</think>"


@dataclass(frozen=True)
class Grammar:
    """A decoding constraint the output must match (compiled by the engine with llguidance)."""

    kind: Literal["json_schema", "lark", "regex", "text"]  # text: any text (a think block's)
    spec: str  # the schema as JSON text, or the grammar / regex source (llguidance's Lark)
    param: str = "response_format"  # the request field it came from, named in errors
    think: ThinkBlock | None = None  # free reasoning first; the grammar applies to the answer


@dataclass
class SamplingParams:
    """Per-request decoding controls; OpenAI names where they exist, vLLM names for the extras."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus k alternatives
    # None: off; k >= 0: each prompt token's own logprob (and rank) plus the top k (vLLM's)
    prompt_logprobs: int | None = None
    grammar: Grammar | None = None  # constrained decoding: every sample matches it
    lora: str | None = None  # the LoRA adapter to run with (its name); None: the base model
    speculative: bool = True  # False: this request never uses the model's speculative decoding
    priority: int = 0  # vLLM's: lower is served first (engine/scheduler.py); batch lines high

    def __post_init__(self) -> None:
        if self.max_tokens < 0:  # 0: score the prompt only (finish after prefill, no token)
            raise InvalidRequestError("max_tokens must be non-negative", "max_tokens")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]", "prompt_logprobs"
            )
        if self.n < 1:
            raise InvalidRequestError("n must be at least 1", "n")
        if self.temperature < 0:
            raise InvalidRequestError("temperature must be non-negative", "temperature")
        if not 0 <= self.top_p <= 1:  # 0 keeps only the most likely token, as OpenAI's does
            raise InvalidRequestError("top_p must be in [0, 1]", "top_p")
        if self.top_k < 0:
            raise InvalidRequestError("top_k must be non-negative", "top_k")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1 or self.top_p == 0


@dataclass(frozen=True)
class ImageInput:
    """One image of a request, as its encoded file bytes (PNG, JPEG, ...), fetched or decoded
    by the server. `detail` is OpenAI's field (auto | low | high), accepted and recorded; the
    model's processor decides the resolution."""

    data: bytes
    detail: str = "auto"


@dataclass
class MultiModalInputs:
    """A prompt's images after the model's processor (engine.multimodal), opaque to the server.

    `data`: the processor's tensors (pixel_values, image_grid_thw, ...), `spans[i]`: (first
    prompt position, token count) of image i's placeholder tokens, `hashes[i]`: sha256 of image
    i's bytes, which keys the prefix-cache blocks holding its tokens. `cache`: the engine's
    per-prompt state (each image's features once encoded, M-RoPE positions), shared by the
    request's samples.
    """

    data: dict[str, Any]
    spans: list[tuple[int, int]]
    hashes: list[str]
    cache: dict[str, Any] = field(default_factory=dict)

    def hashes_in(self, start: int, stop: int) -> tuple[str, ...]:
        """Hashes of the images with placeholder tokens in positions [start, stop)."""
        pairs = zip(self.spans, self.hashes, strict=True)
        return tuple(h for (s, n), h in pairs if s < stop and s + n > start)


@dataclass
class GenerationRequest:
    """One prompt, already tokenized, with its sampling parameters (and, for a vision model's
    prompt with images, their processed inputs; None for text)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    multimodal: MultiModalInputs | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob) pairs
    rank: int | None = None  # 1 + tokens strictly more likely (set for prompt logprobs)


@dataclass
class GenerationOutput:
    """An increment of one sample (`index` among the request's n) of a request."""

    request_id: str
    index: int
    token_ids: list[int]  # new tokens since the previous output of this sample
    text: str  # new text since the previous output (never a partial character or stop string)
    num_prompt_tokens: int
    num_completion_tokens: int  # total so far for this sample
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    # With SamplingParams.prompt_logprobs, on the sample's first output only: one entry per
    # prompt token, None first (nothing precedes it); raw model logprobs (no penalties, bias).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None  # set with finish_reason "error"
    retryable: bool = False  # the error is the server going away, not the request (HTTP 503)
    # prompt tokens whose K/V came from the prefix cache (0 when none did): usage's cached_tokens
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def ended_output(
    request_id: str,
    index: int,
    reason: FinishReason,
    error: str | None = None,
    num_prompt_tokens: int = 0,
    num_completion_tokens: int = 0,
    retryable: bool = False,
) -> GenerationOutput:
    """The last output of a sample ended from outside, with no new token: aborted, or failed
    with `error` (retryable: the server going away). Every such output is built here."""
    return GenerationOutput(
        request_id=request_id,
        index=index,
        token_ids=[],
        text="",
        num_prompt_tokens=num_prompt_tokens,
        num_completion_tokens=num_completion_tokens,
        finish_reason=reason,
        error=error,
        retryable=retryable,
    )


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hits: int = 0  # prompt tokens served from the prefix cache
    num_prefilled_tokens: int = 0  # prompt tokens computed (cache hits excluded)
    num_preemptions: int = 0
    cpu_threads: int = 0  # the engine thread's CPU team size now (0: not a CPU engine)
    spec_proposed_tokens: int = 0  # speculative decoding: draft tokens verified
    spec_accepted_tokens: int = 0  # of those, accepted
    waiting_by_priority: dict[int, int] = field(default_factory=dict)  # queued sequences


@dataclass
class ModelInfo:
    """What the server needs to know about a served model."""

    model_id: str
    source: str
    max_model_len: int
    device: str
    dtype: str
    kv_capacity_tokens: int
    created: int
    aliases: list[str] = field(default_factory=list)
    default_sampling: dict[str, Any] = field(default_factory=dict)
    max_token_chars: int = 64  # longest token's text: len(text) / this <= tokens, a cheap bound
    tool_parser: str = "hermes"  # how the model writes tool calls: hermes | llama3_json
    template_tools: bool = False  # the chat template renders `tools` itself
    reasoning_parser: str = "none"  # how the model's thinking is told apart: none | think_tags
    task: Literal["generate", "embed", "rerank"] = "generate"  # embed: an EmbeddingClient,
    # rerank: a RerankClient
    vision: bool = False  # an image-text-to-text model: chat accepts image parts (encode_chat_mm)
    parent: str | None = None  # a LoRA adapter's base model id (None: a base model)
    # the token a document starts after (BOS, else EOS as in GPT-2): an empty completions
    # prompt generates from it; None: the tokenizer has neither
    document_start_id: int | None = None


class EngineClient(Protocol):
    """What the server calls: tokenization, generation as an async stream, abort, stats."""

    info: ModelInfo

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]: ...

    def encode_chat_mm(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        template_kwargs: dict[str, Any] | None,
        images: Sequence[ImageInput],
    ) -> tuple[list[int], MultiModalInputs]:
        """Vision models: the rendered conversation (`{"type": "image"}` content parts, one per
        image in order) through the model's processor: prompt ids with each image's
        placeholder tokens expanded, and the processed images."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def token_pieces(self, token_ids: Sequence[int]) -> list[tuple[bytes, bool]]:
        """Each token's raw bytes (exact, not decoded alone) and whether it is special."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def fail_all(self, message: str) -> None: ...

    def stats(self) -> EngineStats: ...

    @property
    def is_alive(self) -> bool: ...

    def shutdown(self) -> None: ...


@dataclass
class EmbeddingRequest:
    """Inputs to embed: texts (tokenized by the engine, instruction prefix added) or token ids.

    `dimensions`: keep the first d values and renormalise (Matryoshka models only);
    `prompt_name`: a key of the model's sentence-transformers `prompts` (None: its default).
    """

    request_id: str
    inputs: list[str] | list[list[int]]
    dimensions: int | None = None
    prompt_name: str | None = None


@dataclass
class EmbeddingResult:
    """One float32 vector per input, in input order, and the tokens they took."""

    embeddings: list[list[float]]  # [num inputs][dimensions]
    prompt_tokens: int


class EmbeddingClient(EngineClient, Protocol):
    """An embedding model's engine (ModelInfo.task == "embed"): batches inputs from every
    request into forwards on its own thread."""

    max_inputs: int  # inputs per request at most

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...


@dataclass
class RerankRequest:
    """(query, document) pairs to score, texts tokenized by the engine.

    `truncate_prompt_tokens`: None: a pair longer than the model takes is an error; k >= 1: each
    pair is cut to k tokens (a cross-encoder's longer side first, a decoder's document from its
    end); -1: to the model's length.
    """

    request_id: str
    pairs: list[tuple[str, str]]
    truncate_prompt_tokens: int | None = None
    field: str = "documents"  # the request field errors about one pair name (`documents[i]`)


@dataclass
class RerankResult:
    """One relevance score per pair, in pair order, and the tokens they took."""

    scores: list[float]
    prompt_tokens: int


class RerankClient(EngineClient, Protocol):
    """A rerank model's engine (ModelInfo.task == "rerank"): a cross-encoder or a decoder that
    scores with its answer tokens; batches pairs from every request on its own thread. An
    InvalidRequestError about one pair names `documents[i]` (the server maps the field)."""

    max_inputs: int  # pairs per request at most

    async def rerank(self, request: RerankRequest) -> RerankResult: ...
