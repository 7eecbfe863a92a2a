"""Request and response schemas (they are the OpenAPI document).

Requests are strict: unknown fields are rejected, and nothing is coerced (`"5"` is not the integer 5, `1` is
not `true`). Example IDs are JSON integers in [0, 2**63 - 1] or strings of 1-256 UTF-8 bytes, exactly the
IDs the store accepts; the integer 5 and the string "5" are different IDs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag

MAX_INT_ID = 2**63 - 1
MAX_ID_BYTES = 256
MAX_FORGET_IDS = 10_000
MAX_TEXT_CHARS = 20_000
MAX_K = 1_000
MAX_AUDIT_PAGE = 1_000


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


def _id_bytes(value: str) -> str:
    if len(_utf8(value).encode("utf-8")) > MAX_ID_BYTES:
        raise ValueError(f"string IDs are at most {MAX_ID_BYTES} UTF-8 bytes")
    return value


IntId = Annotated[int, Field(strict=True, ge=0, le=MAX_INT_ID)]
StrId = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ID_BYTES), AfterValidator(_id_bytes)]
ExampleIdIn = Annotated[IntId | StrId, Field(description="an integer in [0, 2**63 - 1] or a 1-256 byte string")]
ExampleId = int | str
Text = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(_utf8)]
RequestId = Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", description=(
    "Idempotency key: repeating it returns the original job (409 if the body differs). Default: the job id."))]
Mode = Literal["first_epoch", "iterative"]
Metric = Literal["jaccard", "containment"]
K = Annotated[int, Field(strict=True, ge=1, le=MAX_K, description="how many examples to return")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _tagged_union(members: dict[str, type[BaseModel]], message: str) -> Any:
    """A request body that is one of `members`, chosen by which of their keys (the field that says what
    the body is: `ids` or `text`, say) it has.

    A plain union tries every member and reports all their errors, so a by-text body with a bad threshold
    would be answered "ids: field required" first. Chosen by the field, only the matching schema validates
    the body and its errors name the real problem. Tags are the model names: an error's location reads
    `body.ForgetByText.threshold`, as a plain union's did. The OpenAPI document stays a plain `oneOf`."""
    def tag(body: Any) -> str | None:
        present = body if isinstance(body, dict) else getattr(type(body), "model_fields", {})
        return next((model.__name__ for field, model in members.items() if field in present), None)

    first, second = (Annotated[model, Tag(model.__name__)] for model in members.values())
    return Annotated[first | second, Discriminator(tag, custom_error_type="body_kind", custom_error_message=message)]


# ------------------------------------------------------------------------------------------------- errors
class ValidationDetail(_Out):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(_Out):
    """Every error: a stable `code`, a human `message`, the IDs concerned if any, validation details if any."""

    code: str = Field(description="machine-readable: unauthorized, unknown_id, erased, already_erased, no_match, "
                                  "invalid_request, invalid_input, body_too_large, queue_full, ...")
    message: str
    ids: list[ExampleId] | None = None
    details: list[ValidationDetail] | None = None


# ------------------------------------------------------------------------------------------------- health
class Health(_Out):
    status: Literal["ok"]


# -------------------------------------------------------------------------------------------------- stats
class StoreStats(BaseModel):
    # Mirrors `gradstore.StoreStats.to_dict()`; fields the library adds later pass through.
    model_config = ConfigDict(extra="allow")
    uri: str
    model_id: str
    dtype: str
    dim: int
    vocab_size: int
    format_version: int
    examples: int
    rows: int
    segments: int
    tombstones: int
    shadowed_copies: int
    bytes_on_disk: int
    rows_logical_bytes: int
    rows_stored_bytes: int
    compression_ratio: float
    codec: dict[str, Any]


class ModelInfo(_Out):
    hash: str = Field(description="sha256 of the served weights (`gradstore_unlearn.unlearn.model_hash`)")
    version: int = Field(description="0 at startup, +1 at each committed forget")
    device: str
    vocab_size: int
    max_positions: int | None
    tokenizer: bool = Field(description="whether text queries are possible")


class JobCounts(_Out):
    queued: int
    running: int


class Stats(_Out):
    store: StoreStats
    model: ModelInfo
    jobs: JobCounts
    degraded: str | None = Field(None, description=(
        "why forgets are refused (503 `degraded`) and queued jobs wait until the server restarts; null when "
        "forgets are accepted"))


# ----------------------------------------------------------------------------------------------- examples
class ExampleQuery(BaseModel):
    # Query strings are text, so values are parsed ("true", "5"); unknown parameters are still refused.
    model_config = ConfigDict(extra="forbid")
    rows: bool = Field(False, description="include the [n_tokens, dim] gradient rows")
    id_type: Literal["auto", "int", "str"] = Field("auto", description="how to read the ID in the path")


class ExampleOut(_Out):
    id: ExampleId
    id_type: Literal["int", "str"]
    n_tokens: int = Field(description="distinct tokens of the example: one gradient row each")
    token_ids: list[int]
    dtype: str = Field(description="the store's row dtype (rows are returned dequantised to float32)")
    dim: int
    meta: dict[str, Any] = Field(description="the metadata captured with the example; `tokens` is its sequence")
    rows: list[list[float]] | None = Field(None, description="[n_tokens, dim] float32 rows, only with rows=true")


# ---------------------------------------------------------------------------------------------- influence
class InfluenceById(_Strict):
    id: ExampleIdIn
    k: K = 10


class InfluenceByText(_Strict):
    text: Text
    k: K = 10


InfluenceBody = _tagged_union({"id": InfluenceById, "text": InfluenceByText},
                              "the body needs `id` (a stored example) or `text`")


class InfluenceQuery(_Out):
    kind: Literal["id", "text"]
    id: ExampleId | None = None
    n_tokens: int | None = Field(None, description="tokens of the query text")


class Influence(_Out):
    id: ExampleId
    score: float = Field(description="<query rows, stored first-epoch rows>: > 0 pulls the model the same way")


class InfluenceResult(_Out):
    query: InfluenceQuery
    k: int
    results: list[Influence]


# ------------------------------------------------------------------------------------------------- forget
class ForgetByIds(_Strict):
    ids: list[ExampleIdIn] = Field(min_length=1, max_length=MAX_FORGET_IDS)
    mode: Mode | None = Field(None, description="calibration mode; default: the server's (GRADSTORE_DEFAULT_MODE)")
    dry_run: bool = Field(False, description="only report what would be forgotten")
    request_id: RequestId | None = None


class ForgetByText(_Strict):
    text: Text = Field(description="forget every stored example whose token sequence matches this text")
    # Above 0: at 0 every stored example would match. Preview what a threshold matches with dry_run first.
    threshold: float = Field(0.5, gt=0.0, le=1.0, allow_inf_nan=False)
    metric: Metric = "jaccard"
    mode: Mode | None = None
    dry_run: bool = False
    request_id: RequestId | None = None


ForgetBody = _tagged_union({"ids": ForgetByIds, "text": ForgetByText},
                           "the body needs `ids` (a list of IDs) or `text`")


class Match(_Out):
    id: ExampleId
    jaccard: float
    containment: float


class JobError(_Out):
    code: str
    message: str


class ForgetExample(_Out):
    """Where one example of a forget request ended (in the order of the live IDs it acted on: results carry no IDs)."""

    loss_before: float
    loss_after: float
    target: float = Field(description="its own target loss when fresh iterative steps ran, else the mean target")
    tokens: int = Field(description="distinct tokens in the example")
    owned_tokens: int = Field(description="tokens at least half of whose stored examples the request forgets")


class DriftReading(_Out):
    budget: float = Field(description="the fraction the retained examples' loss (and perplexity) may rise over all "
                                      "forget requests together")
    kind: Literal["perplexity", "loss"]
    baseline_model_hash: str = Field(description="the model the budget was set on")
    members: int = Field(description="panel examples measured (still stored, not being forgotten)")
    baseline_loss: float = Field(description="their mean loss on the baseline model (nats)")
    loss: float = Field(description="their mean loss on the model read (nats)")
    change: float = Field(description="the change since the baseline, as the budget reads it (a fraction)")
    remaining_nats: float = Field(description="the rise of mean loss the budget has left (negative: overspent)")


class DriftChange(_Out):
    before: DriftReading = Field(description="on the model the request started from")
    after: DriftReading = Field(description="on the model it left")


class DriftStatus(_Out):
    drift: DriftReading | None = Field(description="the store's drift budget read on the weights served; null "
                                                   "when the store has none (each request is bounded by its own "
                                                   "retain guard only)")


class ForgetResult(_Out):
    status: Literal["forgotten", "target_not_met", "dry_run", "nothing_to_do"]
    n_ids: int = Field(description="live IDs the request acted on (forgotten if status is 'forgotten')")
    n_already_forgotten: int
    target_loss: float | None = None
    forget_loss_before: float | None = None
    forget_loss_after: float | None = None
    retain_loss_before: float | None = None
    retain_loss_after: float | None = None
    retain_change: float | None = None
    scale: float | None = None
    iterations: int | None = None
    evaluations: int | None = None
    model_hash_before: str | None = None
    model_hash_after: str | None = Field(
        default=None, description="the weights the request left; for target_not_met a state that is never "
                                  "published (the next request starts from the published weights again)")
    drift: DriftChange | None = Field(default=None, description="the store's drift budget before and after the "
                                                                "request; null when the store has none")
    erasure_receipt: str | None = None
    seconds: float | None = None
    message: str | None = None
    examples: list[ForgetExample] | None = Field(
        default=None, description="one entry per live example the request acted on, in request order")


class Job(_Out):
    job_id: str
    request_id: str
    kind: Literal["forget"]
    status: Literal["queued", "running", "interrupted", "completed", "failed", "rolled_back"] = Field(
        description="completed: the request ran, and `result.status` says whether its examples were forgotten "
                    "(target_not_met: nothing was erased or published; a retry needs a new request_id). "
                    "interrupted: its commit failed and the server stopped taking forgets; the next start "
                    "settles the job (completed if its weights reached the disk, else run again)")
    mode: Mode
    dry_run: bool
    source: Literal["ids", "text"]
    n_ids: int
    id_hashes: list[str] = Field(description="salted hashes of the IDs (as in tombstones and the audit log)")
    ids: list[ExampleId] | None = Field(None, description=(
        "the IDs, while the job is pending and in the response that created it; finished jobs keep only hashes"))
    matches: list[Match] | None = Field(None, description="text requests: the matches, in the creating response")
    attempts: int
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    result: ForgetResult | None
    error: JobError | None


# -------------------------------------------------------------------------------------------------- audit
class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    offset: int = Field(0, ge=0, le=2**53, description="records to skip")
    limit: int = Field(100, ge=1, le=MAX_AUDIT_PAGE, description="records per page")


class AdoptedModel(_Out):
    model_hash: str
    previous_head: str | None = Field(description="where the audit log ended before it was adopted")


class AuditChain(_Out):
    whole: bool = Field(description="every audited change starts from the model the one before it left, and the "
                                    "last one's weights are the ones served")
    commits: int = Field(description="committed forgets since the newest `trained` record (all, without one)")
    carried: int = Field(description="uncommitted changes saved by a later commit (named in its record)")
    first_hash: str | None = Field(description="the model the chain starts from: the newest trained model's where "
                                               "training recorded it, else the one the first audited change started "
                                               "from")
    trained_hash: str | None = Field(description="the model the newest training with capture ended with (a "
                                                 "`trained` audit record); null if none was recorded")
    last_hash: str | None = Field(description="the model the last commit saved")
    model_hash: str | None = Field(description="the weights served now")
    problems: list[str]
    pending: list[str] = Field(description="request ids whose weights are saved but whose audit record is not "
                                           "yet written")
    adopted: list[AdoptedModel] = Field(description="models adopted since the newest training (`gradstore audit "
                                                    "--adopt`), oldest first: changes made off the record, named")


class AuditPage(_Out):
    items: list[dict[str, Any]] = Field(description="audit records, oldest first (they hold ID hashes only)")
    offset: int
    limit: int
    total: int
    next_offset: int | None
