"""The one settings model: ``config.yaml`` plus ``ECASHBOT_`` environment overrides.

Loaded once at start-up by :func:`load_config` and passed in; no other module reads the
environment. ``GEMINI_API_KEY`` / ``GOOGLE_GEMINI_BASE_URL`` are left to the google-genai
SDK, which reads them itself, unless ``gemini.api_key`` / ``gemini.base_url`` are set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from mint_client.tokens import normalize_mint_url
from pricing import ModelPrice


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpConfig(_Section):
    """The HTTP transport."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: largest request body (the chat messages), in bytes
    max_body_bytes: int = Field(default=1_000_000, gt=0)
    #: largest X-Cashu header we read; longer is refused before any parsing
    max_token_bytes: int = Field(default=64_000, gt=0)
    #: header holding the client address when behind a trusted reverse proxy
    #: (e.g. X-Forwarded-For; its first address is used). null: the socket's peer
    trusted_proxy_header: str | None = None


class WalletConfig(_Section):
    """Where the bot keeps its seed, proofs and payment record."""

    path: Path = Path("./data")
    #: timeout of one call to a mint, seconds
    mint_timeout_s: float = Field(default=20.0, gt=0)
    #: how long a payment's change can be fetched again (POST /v1/change, /change), seconds
    change_pickup_ttl_s: int = Field(default=7 * 86400, gt=0)
    #: seconds between passes that resolve payments a crash or a lost answer interrupted
    recovery_interval_s: float = Field(default=60.0, gt=0)
    #: a payment is left alone by the periodic pass until it is this old, seconds (at
    #: start-up every interrupted payment is resolved at once)
    recovery_min_age_s: float = Field(default=30.0, ge=0)


class GeminiConfig(_Section):
    """The google-genai client."""

    #: None: the SDK reads GEMINI_API_KEY itself
    api_key: str | None = None
    #: None: the SDK reads GOOGLE_GEMINI_BASE_URL, else Google's endpoint
    base_url: str | None = None
    api_version: str | None = None
    #: whole-call timeout (a stream included), seconds
    timeout_s: float = Field(default=120.0, gt=0)
    #: attempts per call before the payment is refunded (1 = no retry)
    attempts: int = Field(default=1, ge=1, le=5)


class ModelConfig(_Section):
    """Price and limits of one model. Money is integer msat."""

    input_msat_per_1k: int = Field(ge=0)
    output_msat_per_1k: int = Field(ge=0)
    request_msat: int = Field(default=0, ge=0)
    max_output_tokens: int = Field(default=8192, gt=0)
    #: thinking tokens allowed (billed as output, within the cap); 0 turns thinking off
    thinking_budget: int = Field(default=0, ge=0)

    def price(self) -> ModelPrice:
        """The pure pricing view of this model."""
        return ModelPrice(
            input_msat_per_1k=self.input_msat_per_1k,
            output_msat_per_1k=self.output_msat_per_1k,
            request_msat=self.request_msat,
            max_output_tokens=self.max_output_tokens,
        )


class LimitsConfig(_Section):
    """What one paid request may be."""

    #: a payment must buy at least this many output tokens, else it is refused unspent
    min_output_tokens: int = Field(default=32, gt=0)
    #: output tokens the 402 payment request asks for when the client set no max_tokens
    default_output_tokens: int = Field(default=1024, gt=0)
    #: largest question (all messages), in characters
    max_input_chars: int = Field(default=200_000, gt=0)


class FastPathConfig(_Section):
    """Taking the mint off the answer's critical path."""

    #: start the model while the swap runs (after every check that spends nothing); its
    #: output is held back until the swap clears, and a failed swap cancels the call
    overlap: bool = True


class LockedConfig(_Section):
    """Tokens locked to the bot (NUT-11 P2PK with NUT-12 DLEQ): paid with no mint call.

    Nobody but the bot can spend such a token, so it is accepted offline (its proofs'
    Ys claimed once in the state store), answered, and swapped into the bot's own proofs
    later, in batches. Change comes from a stock of the bot's own small proofs.
    """

    #: accept locked tokens and advertise the bot's lock key (402 ``nut10``,
    #: ``GET /v1/models``, a NIP-61 kind 10019 event)
    enabled: bool = True
    #: a lock whose refund path (``locktime``) opens sooner than this is refused, seconds:
    #: the bot must have swapped the proofs before the sender can take them back
    min_lock_s: int = Field(default=3600, ge=60)
    #: seconds between batch swaps of accepted locked proofs
    sweep_interval_s: float = Field(default=30.0, gt=0)
    #: most locked proofs swapped in one batch
    sweep_max_inputs: int = Field(default=200, ge=1, le=1000)
    #: small proofs kept ready per mint for change, in sat (refilled by the batch swaps)
    stock_sat: int = Field(default=4096, ge=0)


class RateLimitConfig(_Section):
    """Token buckets per payer (Nostr pubkey, or client IP over HTTP)."""

    #: requests a payer may burst
    requests_capacity: int = Field(default=60, gt=0)
    #: requests per second refilled
    requests_per_s: float = Field(default=1.0, gt=0)
    #: LLM tokens (input estimate + output cap) a payer may burst
    tokens_capacity: int = Field(default=2_000_000, gt=0)
    #: LLM tokens per second refilled
    tokens_per_s: float = Field(default=2_000.0, gt=0)


class BudgetConfig(_Section):
    """A daily LLM-token budget (UTC days) that protects the operator's Gemini quota."""

    #: tokens per UTC day over all models; null: no budget
    daily_tokens: int | None = Field(default=None, gt=0)
    #: tokens per UTC day for single models
    per_model: dict[str, int] = Field(default_factory=dict)
    #: tokens kept free under each limit (answers may use more than reserved)
    safety_buffer: int = Field(default=0, ge=0)


class OperatorConfig(_Section):
    """What only the operator may see."""

    #: bearer token for GET /v1/stats, /dashboard and /metrics; null turns them off
    token: str | None = None
    #: GET /metrics needs the token too (false: open to anyone who can reach the port)
    metrics_require_token: bool = True
    #: seconds between the dashboard's refreshes
    dashboard_refresh_s: float = Field(default=10.0, gt=0)


class NostrConfig(_Section):
    """The Nostr DM transport (NIP-17 gift wraps and NIP-04)."""

    enabled: bool = False
    #: the bot's key (nsec1... or hex); `ecashbot keys` makes one
    nsec: str | None = None
    #: relays to read DMs from and publish replies to (also listed in kind 10050)
    relays: list[str] = Field(default_factory=list)
    #: profile (kind 0) name; the about text is made from the prices
    name: str = "ecashbot"
    #: how far back to ask relays for DMs; NIP-17 wraps are backdated up to 2 days
    lookback_s: int = Field(default=2 * 86400 + 3600, ge=0)
    #: largest question in a DM, characters (the token not counted)
    max_message_chars: int = Field(default=20_000, gt=0)
    #: paid questions one sender may have in flight at once
    max_concurrent_per_sender: int = Field(default=2, gt=0)
    #: how long a reply that failed to send is retried, seconds
    reply_ttl_s: int = Field(default=86400, gt=0)
    #: the same for a reply that carries change or a refund
    change_reply_ttl_s: int = Field(default=7 * 86400, gt=0)
    #: seconds between retries of unsent replies
    retry_interval_s: float = Field(default=2.0, gt=0)
    #: seconds between reconnection attempts to a relay that went away
    reconnect_s: float = Field(default=2.0, gt=0)

    @field_validator("relays")
    @classmethod
    def _relay_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"relay {url!r} must be a ws:// or wss:// URL")
        return v


class RedisConfig(_Section):
    """Shared state (replay protection, rate limits, budget, statistics)."""

    #: redis://host:port/db; null keeps the state embedded in this process (wallet.path)
    url: str | None = None


class LightningConfig(_Section):
    """Paying by Lightning invoice: NUT-04 mint quotes at the first mint, as payments."""

    #: offer an invoice with every 402 and to every DM question that came without a token
    invoices: bool = True
    #: the DM invoice when no amount is given (``/invoice N``); null: what the question needs
    default_invoice_sat: int | None = Field(default=None, gt=0)
    #: the largest invoice handed out, sat
    max_invoice_sat: int = Field(default=100_000, gt=0)
    #: seconds between checks of a waiting invoice when the mint has no NUT-17 websocket
    poll_interval_s: float = Field(default=2.0, gt=0)
    #: a paid invoice nobody used this long (or its question was lost) is minted and its
    #: sats kept as a refund (DM, or POST /v1/change with X-Cashu-Quote), seconds
    refund_unused_after_s: int = Field(default=1800, gt=0)


class PayoutConfig(_Section):
    """Paying the operator out automatically, by Lightning address (LUD-16), per mint."""

    #: name@host to pay; null turns automatic payouts off
    lnaddress: str | None = None
    #: pay out when the free balance at a mint is above this, sat
    threshold_sat: int = Field(default=10_000, gt=0)
    #: sat left at the mint after a payout (fees are paid from the payout, not from this)
    float_sat: int = Field(default=1_000, ge=0)
    #: seconds between checks
    interval_s: float = Field(default=3600.0, gt=0)
    #: the largest Lightning fee reserve accepted for one payout, in percent of it (the
    #: limit is never below 10 sat: mints reserve a minimum fee)
    max_fee_percent: float = Field(default=2.0, ge=0)

    @field_validator("lnaddress")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and (v.count("@") != 1 or not all(v.split("@"))):
            raise ValueError(f"{v!r} is not a Lightning address (name@host)")
        return v

    @model_validator(mode="after")
    def _float_below_threshold(self) -> PayoutConfig:
        if self.float_sat >= self.threshold_sat:
            raise ValueError("payout.float_sat must be below payout.threshold_sat")
        return self


class LogConfig(_Section):
    """How the bot writes its log (to stderr)."""

    #: plain: one human-readable line per record; json: one JSON object per line
    format: Literal["plain", "json"] = "plain"


def _default_models() -> dict[str, ModelConfig]:
    return {
        "gemini-2.5-flash": ModelConfig(
            input_msat_per_1k=300, output_msat_per_1k=2500, max_output_tokens=65536
        ),
        "gemini-2.5-flash-lite": ModelConfig(
            input_msat_per_1k=100, output_msat_per_1k=400, max_output_tokens=65536
        ),
    }


class Config(BaseSettings):
    """Everything the bot can be told. See config.yaml for each key."""

    model_config = SettingsConfigDict(
        env_prefix="ECASHBOT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    #: the allow-list of mints; the first is where the bot asks to be paid
    mints: list[str] = Field(min_length=1)
    unit: str = "sat"
    default_model: str = "gemini-2.5-flash"
    models: dict[str, ModelConfig] = Field(default_factory=_default_models)
    http: HttpConfig = HttpConfig()
    wallet: WalletConfig = WalletConfig()
    gemini: GeminiConfig = GeminiConfig()
    limits: LimitsConfig = LimitsConfig()
    fast_path: FastPathConfig = FastPathConfig()
    locked: LockedConfig = LockedConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    budget: BudgetConfig = BudgetConfig()
    operator: OperatorConfig = OperatorConfig()
    nostr: NostrConfig = NostrConfig()
    redis: RedisConfig = RedisConfig()
    log: LogConfig = LogConfig()
    lightning: LightningConfig = LightningConfig()
    payout: PayoutConfig = PayoutConfig()
    log_level: str = "INFO"

    @field_validator("mints")
    @classmethod
    def _normalize_mints(cls, v: list[str]) -> list[str]:
        out = [normalize_mint_url(u) for u in v]
        if len(set(out)) != len(out):
            raise ValueError("a mint is listed twice")
        return out

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str) -> str:
        if v != "sat":
            raise ValueError("only 'sat' is supported")
        return v

    @model_validator(mode="after")
    def _default_model_exists(self) -> Config:
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not in models")
        if self.nostr.enabled and not (self.nostr.nsec and self.nostr.relays):
            raise ValueError("nostr.enabled needs nostr.nsec and nostr.relays")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment over the YAML file over defaults (init kwargs carry the YAML)."""
        return (env_settings, init_settings)


class ConfigError(Exception):
    """The configuration is unusable; the message is one line naming the key."""


def load_config(path: Path | None, **overrides: Any) -> Config:
    """Read ``path`` (YAML; None for none), apply the environment, validate.

    Raises :class:`ConfigError` with one line naming the first bad key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        if not path.exists():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = YamlConfigSettingsSource(Config, yaml_file=path)()
        except Exception as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        data.update(raw)
    data.update(overrides)
    try:
        return Config(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        raise ConfigError(f"config error at {key}: {err['msg']}{shown}") from None
