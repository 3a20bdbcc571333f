"""EPSConfig: the one place where megatron-eps settings are declared, parsed and validated."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Union

from megatron_eps.errors import EPSConfigError

# Allowed ``expert_kernel`` values: "auto" (pick per load from the cost table,
# megatron_eps.experts.selector) and every registered expert backend
# (megatron_eps.experts.base.kernel_names, the one list): grouped (torch._grouped_mm), triton
# (our Triton grouped GEMM), dense (one cuBLAS GEMM per expert), te (Transformer Engine
# GroupedLinear, where it imports), megatron (the layer's own experts module).
# ``EXPERT_KERNELS`` (module attribute) reads them from the registry.


def __getattr__(name):
    if name == "EXPERT_KERNELS":
        return _kernel_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _kernel_names() -> tuple:
    from megatron_eps.experts.base import kernel_names

    return kernel_names()

CHUNK_SPLITS = ("auto", "equal", "tail")
"""Allowed ``chunk_split`` values. Chunks are always groups of local experts (the paper's
horizontal split); this says how many experts each chunk holds:

equal -- N chunks of (nearly) equal size, as in the paper
tail  -- the last chunk holds one expert and the others split the rest evenly: the last combine,
         which no GEMM can hide, moves 1/E of the rows instead of 1/N
auto  -- with pipeline_degree="auto" the cost model picks equal or tail per forward; with a fixed
         degree, equal
"""


TRANSPORTS = ("auto", "nccl", "copy_engine")
"""Allowed ``transport`` values: how a chunk's rows travel between the ranks of the EP group.

nccl        -- torch.distributed all_to_all_single (NCCL on GPUs, gloo on CPU); works anywhere,
               but its kernels need SMs, so beside a persistent grouped GEMM it does not overlap
copy_engine -- the GPUs' copy engines write each row straight into its final place in the
               peer's symmetric-memory buffer (no SMs): every EP rank on one node with peer
               access (NVLink), CUDA, torch symmetric memory and cuda-bindings
auto        -- copy_engine where it can work, else nccl (logged once)
"""


LOCAL_ROWS = ("together", "apart")
"""Allowed ``local_rows`` values: how a chunk's GEMMs treat the rows a rank routed to its own
experts (which never cross the link).

together -- one grouped GEMM per chunk over every row of its experts (the stock order)
apart    -- two per chunk: first whole 128-row tiles of the rank's own rows, which need no
            transfer, so they run beside the first dispatch; then the rest. In the last chunk
            the own rows come last and run beside its combine. The first dispatch and the last
            combine, which no GEMM of their chunk could hide, then overlap (copy_engine
            transport without dedup; elsewhere together). Not the default until it is measured
            on a multi-GPU link
"""


DISPATCH_DEDUPS = ("off", "on", "auto")
"""Allowed ``dispatch_dedup`` values: how many copies of a token a chunk's dispatch sends.

off  -- one row per (token, expert), as Megatron's alltoall dispatcher (the default: the time
        saved on a real link has not been measured yet)
on   -- one row per (token, destination rank, chunk) carrying the token's expert indices and
        weights; the expert rank expands it and sends back one pre-reduced row (nccl transport;
        elsewhere the forward keeps one row per pair)
auto -- on when the forward's layout moves at least 10% fewer remote bytes that way
"""


PLAN_ROWS_ON_DEVICE = ("auto", "on", "off")
"""Allowed ``plan_rows_on_device`` values: where a forward without expert parallelism counts
its routed rows per expert.

auto -- on the device, on GPUs: the host issues the whole layer without waiting for the GPU,
        and the experts run from device offsets (expert_kernel auto: the grouped GEMM; grouped
        or triton as set). Applies with one chunk (pipeline_degree auto or 1), every token
        routed top-k times (no padding mask), one row per pair and an expert backend that
        takes device offsets for the dtype; elsewhere the host reads the counts
on   -- the same wherever it applies, CPUs included
off  -- the host reads the counts (one sync per layer) and expert_kernel auto chooses a
        backend by the load (the default until the device plan is timed on a GPU)
"""


DEDUP_COMBINE_DTYPES = ("model", "fp32")
"""Allowed ``dedup_combine_dtype`` values: the dtype the pre-reduced sums of the deduplicated
combine travel in (they are always accumulated in fp32, and the source sums them in fp32).

model -- the activations' dtype (bf16): each partial sum is rounded once more; on the CPU
         equivalence grid in bf16 the error vs a float64 reference grew by up to 0.2% over stock's
         (whose CPU sum rounds once). The default: with fp32 sums the combine moves twice the
         bytes, and at EP=8 the deduplicated scheme then sends more than one row per pair
fp32  -- one rounding, at the source's final sum: the error vs float64 equals the per-pair
         scheme's on that grid
"""


@dataclass(frozen=True)
class Setting:
    """How one EPSConfig field is checked and offered on the command line.

    kind: "bool", "choice" (one of ``choices``), "kernel" (an expert kernel: "auto" or a
    registered backend), "degree" (an int >= 1 or "auto"), "int>=0",
    "int>=1" (None allowed when the default is None), "path" (a file).
    """

    kind: str
    help: str
    choices: tuple = ()
    metavar: Optional[str] = None
    flag: Optional[str] = None
    # True when ranks may differ in it (nothing that all ranks must agree on depends on it)
    per_rank: bool = False

    ALLOWED = {
        "degree": "an integer >= 1 or 'auto'",
        "int>=0": "integers >= 0",
        "int>=1": "integers >= 1",
    }


def _setting(default, kind: str, **meta):
    return dataclasses.field(default=default, metadata={"eps": Setting(kind, **meta)})


@functools.lru_cache(maxsize=None)
def settings() -> Dict[str, Setting]:
    """EPSConfig's fields and how each is checked and offered (the one list of settings)."""
    return {f.name: f.metadata["eps"] for f in fields(EPSConfig)}


def flag_of(name: str) -> str:
    """The command-line flag of setting ``name`` (``--eps-<name>`` unless it says otherwise)."""
    return settings()[name].flag or "--eps-" + name.replace("_", "-")


def check_setting(name: str, value):
    """``value`` checked (and normalised) for setting ``name``; EPSConfigError naming both
    and the allowed values otherwise."""
    setting = settings()[name]
    kind = setting.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise EPSConfigError(f"eps {name} must be true or false, got {value!r}")
        return value
    if kind in ("choice", "kernel"):
        choices = setting.choices if kind == "choice" else _kernel_names()
        if value not in choices:
            raise EPSConfigError(
                f"eps {name}={value!r} is not allowed; allowed values: {', '.join(choices)}"
            )
        return value
    if kind == "degree":
        return _check_pipeline_degree(value)
    if kind in ("int>=0", "int>=1"):
        if value is None and _DEFAULTS[name] is None:
            return None
        return (_non_negative_int if kind == "int>=0" else _positive_int)(name, value)
    if kind == "outpath":
        if value is None:
            return None
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise EPSConfigError(f"eps {name} must be a file path or null, got {value!r}")
        value = os.fspath(value)
        if os.path.isdir(value):
            raise EPSConfigError(f"eps {name}={value!r} is a directory; allowed: a file path")
        return value
    if kind == "path":
        if value is None:
            return None
        if not isinstance(value, (str, os.PathLike)):
            raise EPSConfigError(f"eps {name} must be a file path or null, got {value!r}")
        value = os.fspath(value)
        if not os.path.isfile(value):
            raise EPSConfigError(
                f"eps {name}={value!r}: no such file "
                "(write one with megatron-eps-calibrate, or leave it unset)"
            )
        from megatron_eps.policy.profile import check_cost_profile_file

        check_cost_profile_file(value)
        return value
    raise AssertionError(f"unknown setting kind {kind!r}")


def parse_setting(name: str, text: str):
    """A command-line value of setting ``name``: the text read as the setting's kind says, then
    checked by ``check_setting`` (EPSConfigError if it is not allowed)."""
    value = text
    if settings()[name].kind in ("int>=0", "int>=1", "degree"):
        try:
            value = int(text)
        except ValueError:
            pass  # check_setting names the setting and the allowed values
    return check_setting(name, value)


def check_keys(keys, source: str) -> None:
    """EPSConfigError naming each key of ``keys`` that is no setting, the closest setting, and
    every allowed key (the one check for the constructor, YAML files and mappings)."""
    allowed = tuple(settings())
    unknown = sorted(set(keys) - set(allowed))
    if not unknown:
        return
    named = []
    for key in unknown:
        closest = difflib.get_close_matches(str(key), allowed, n=1)
        named.append(repr(key) + (f" (did you mean {closest[0]!r}?)" if closest else ""))
    raise EPSConfigError(
        f"{source}: unknown eps key(s) {', '.join(named)}; allowed keys: {', '.join(allowed)}"
    )


def _refuse_unknown_keys(cls):
    """Wrap the dataclass's ``__init__`` so that a misspelt keyword raises EPSConfigError like a
    misspelt YAML key, not the bare TypeError of an unexpected argument."""
    generated_init = cls.__init__

    @functools.wraps(generated_init)
    def __init__(self, *args, **kwargs):
        check_keys(kwargs, source=f"{cls.__name__}()")
        generated_init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def read_yaml_file(path, flag: str, error: type) -> Any:
    """The parsed YAML file at ``path``; a missing or malformed file raises ``error`` naming
    ``flag``, the option the path came from."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{flag} {path!r}: no such file")
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise error(f"{flag} {path!r} is not valid YAML: {exc}") from exc


@_refuse_unknown_keys
@dataclass
class EPSConfig:
    """Settings of the EPS-MoE expert pipeline scheduler.

    Attributes:
        enabled: master switch (``--eps-moe``). When False, EPSMoELayer runs the stock forward.
        pipeline_degree: number of chunks N the routed tokens of a layer are split into, an
            int >= 1, or ``"auto"`` to choose N per forward from the cost model. N is clamped to
            the number of local experts (a chunk is a group of local experts).
        expert_kernel: expert GEMM backend: "auto" or a registered backend (EXPERT_KERNELS).
        min_tokens_to_pipeline: below this many tokens per rank (mean over the expert-parallel
            group, so every rank agrees) the layer runs unpipelined (N = 1).
        cost_profile: path of a JSON cost profile written by ``megatron-eps-calibrate``, or None
            to use the profile shipped for the current GPU (if any).
        chunk_split: how many local experts each chunk holds, one of CHUNK_SPLITS.
        max_pipeline_degree: upper bound for ``pipeline_degree="auto"``.
        comm_num_ctas: cap on the CTAs NCCL may use for the all-to-alls (None: NCCL's default).
            Applied through NCCL_MAX_NCHANNELS/NCCL_MAX_CTAS before the process group is built.
        gemm_sm_carveout: SMs held back from the GEMMs (cuBLAS, torch._grouped_mm, our Triton
            kernel) while chunks overlap with communication, so the all-to-all kernels find
            free SMs (None: 0).
        kernel_autotune: self-calibration of ``expert_kernel: auto`` where the cost tables do
            not decide a call: auto (on CUDA devices), on, off.
        kernel_cache: file of the self-calibration decisions (None: the default location).
        transport: how chunks travel between EP ranks, one of TRANSPORTS.
        dispatch_dedup: one row per (token, expert) or per (token, rank, chunk), one of
            DISPATCH_DEDUPS.
        dedup_combine_dtype: dtype of the deduplicated combine's partial sums, one of
            DEDUP_COMBINE_DTYPES.
        local_rows: whether a chunk's own rows get a GEMM call of their own, one of LOCAL_ROWS.
        plan_rows_on_device: whether a forward without expert parallelism keeps the routing
            counts on the device, one of PLAN_ROWS_ON_DEVICE.
    """

    enabled: bool = _setting(True, "bool", flag="--eps-moe",
                             help="Run MoE layers with the EPS pipelined dispatcher (EPSMoELayer).")
    pipeline_degree: Union[int, str] = _setting(
        "auto", "degree", metavar="N|auto",
        help="Chunks per MoE layer: an integer >= 1 or 'auto' (cost model). Default: auto.")
    expert_kernel: str = _setting(
        "auto", "kernel",
        help="Expert GEMM backend. Default: auto (from the cost table).")
    min_tokens_to_pipeline: int = _setting(
        2048, "int>=0", metavar="T",
        help="Run unpipelined below this many tokens per rank (mean over the EP group). "
        "Default: 2048.")
    cost_profile: Optional[str] = _setting(
        None, "path", metavar="PATH",
        help="JSON cost profile from megatron-eps-calibrate. Default: the shipped profile for "
        "this GPU, if any.")
    chunk_split: str = _setting(
        "auto", "choice", choices=CHUNK_SPLITS,
        help="Experts per chunk: equal (the paper), tail (last chunk one expert), or auto (the "
        "cost model picks per forward). Default: auto.")
    max_pipeline_degree: int = _setting(
        16, "int>=1", metavar="N", help="Upper bound for --eps-pipeline-degree auto. Default: 16.")
    comm_num_ctas: Optional[int] = _setting(
        None, "int>=1", metavar="C",
        help="Cap on the CTAs NCCL uses for the all-to-alls. Default: NCCL's choice.")
    gemm_sm_carveout: Optional[int] = _setting(
        None, "int>=0", metavar="S",
        help="SMs held back from the GEMMs while chunks overlap with the all-to-alls, so the "
        "communication kernels find free SMs. Default: 0.")
    kernel_autotune: str = _setting(
        "auto", "choice", choices=("auto", "on", "off"),
        help="Self-calibration of expert_kernel auto where the cost tables do not decide a call "
        "(no tables for the GPU, an expert width they lack, the best backends within 10%%): time "
        "those backends on the first real load of each (shape, load bucket) and keep the fastest "
        "(auto: on CUDA devices; on; off: the tables alone, else the default order). Default: auto.")
    kernel_cache: Optional[str] = _setting(
        None, "outpath", metavar="PATH", per_rank=True,
        help="File of the self-calibration decisions. Default: $MEGATRON_EPS_KERNEL_CACHE, "
        "else ~/.cache/megatron_eps/kernels-<gpu>.json.")
    transport: str = _setting(
        "auto", "choice", choices=TRANSPORTS,
        help="How chunks travel between expert-parallel ranks: copy_engine (SM-free copies "
        "into the peers' symmetric memory; one node with NVLink), nccl (all_to_all_single), "
        "or auto (copy_engine where it works, else nccl). Default: auto.")
    dispatch_dedup: str = _setting(
        "off", "choice", choices=DISPATCH_DEDUPS,
        help="Send each token once per destination rank and chunk and pre-reduce its expert "
        "outputs there (on), one row per (token, expert) as stock Megatron (off), or on when it "
        "saves at least a tenth of the remote bytes (auto). Default: off.")
    dedup_combine_dtype: str = _setting(
        "model", "choice", choices=DEDUP_COMBINE_DTYPES,
        help="Dtype the deduplicated combine's partial sums travel in: model (the activations' "
        "dtype: one more rounding) or fp32 (error as the per-pair scheme, twice the combine "
        "bytes). Default: model.")
    local_rows: str = _setting(
        "together", "choice", choices=LOCAL_ROWS,
        help="A rank's own rows: apart (a GEMM call of their own, beside the first dispatch "
        "and the last combine; copy_engine) or together (one call per chunk). Default: together.")
    plan_rows_on_device: str = _setting(
        "off", "choice", choices=PLAN_ROWS_ON_DEVICE,
        help="Without expert parallelism, keep the routing counts on the GPU: rows numbered "
        "and grouped GEMMs run from device offsets, so the host never waits for the GPU "
        "(auto: on GPUs; on: on any device; off: the host reads the counts and expert_kernel "
        "auto chooses by load). Default: off.")

    def __post_init__(self):
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name, value):
        # Once built, a change is validated like a new config (``cfg.pipeline_degree = -3``
        # raises EPSConfigError and leaves cfg as it was).
        if not self.__dict__.get("_validated") or name not in self.field_names():
            object.__setattr__(self, name, value)
            return
        checked = dataclasses.replace(self, **{name: value})
        object.__setattr__(self, name, getattr(checked, name))

    def __delattr__(self, name):
        if name in self.field_names():
            raise EPSConfigError(f"eps setting {name!r} cannot be deleted")
        object.__delattr__(self, name)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "EPSConfig":
        """Raise EPSConfigError naming the setting and the allowed values if anything is off."""
        for name in self.field_names():
            object.__setattr__(self, name, check_setting(name, getattr(self, name)))
        return self

    def digest(self) -> str:
        """A hash of every setting, equal on two ranks exactly when their settings are equal
        (a cost profile counts by its contents, so the same file at two paths is equal)."""
        return hashlib.sha256(
            json.dumps(self.comparable_dict(), sort_keys=True).encode()
        ).hexdigest()

    def comparable_dict(self) -> dict:
        """to_dict() without the settings each rank may hold for itself (``Setting.per_rank``),
        with cost_profile replaced by a hash of the file's bytes."""
        values = {k: v for k, v in self.to_dict().items() if not settings()[k].per_rank}
        if self.cost_profile is not None:
            try:
                with open(self.cost_profile, "rb") as f:
                    values["cost_profile"] = "sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]
            except OSError:
                pass
        return values

    # ------------------------------------------------------------------ constructors
    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "EPSConfig":
        """Build from a mapping; unknown keys raise an error that lists the allowed keys."""
        if not isinstance(values, Mapping):
            raise EPSConfigError(
                f"{source}: the eps settings must be a mapping of key: value, got "
                f"{type(values).__name__}"
            )
        check_keys(values, source)
        try:
            return cls(**dict(values))
        except EPSConfigError as exc:
            text = str(exc)
            raise EPSConfigError(text if text.startswith(source) else f"{source}: {text}") from None

    @classmethod
    def from_yaml(
        cls,
        path: Union[str, os.PathLike],
        overrides: Optional[Mapping] = None,
        flag: str = "--eps-config",
    ):
        """Read a YAML file holding either the EPS keys at top level or under an ``eps:`` key.

        A model config file (configs/*.yaml) keeps its EPS settings in an ``eps:`` section; a
        pure EPS file holds the keys directly. ``overrides`` (e.g. explicit command-line flags)
        win over the file; the file's own values are checked too, even where a flag overrides
        them. ``flag`` is the option that named the file, for error messages.
        """
        path = os.fspath(path)
        data = read_yaml_file(path, flag, EPSConfigError)
        if data is None:
            raise EPSConfigError(
                f"{flag} {path!r}: the file is empty; allowed: EPS settings at top level or "
                "under an 'eps:' key (e.g. 'pipeline_degree: auto')"
            )
        if not isinstance(data, Mapping):
            raise EPSConfigError(
                f"{flag} {path!r}: expected a mapping at top level, got {type(data).__name__}"
            )
        if "eps" in data:
            section = data["eps"]
            if section is None:
                section = {}
        elif "model" in data:
            # A model config without an eps section: use the defaults.
            section = {}
        else:
            section = data
        if not isinstance(section, Mapping):
            raise EPSConfigError(f"{flag} {path!r}: 'eps' must be a mapping")
        source = f"{flag} {path!r}" + (": eps" if "eps" in data else "")
        cls.from_dict(section, source=source)  # the file alone must be valid
        merged = dict(section)
        merged.update(overrides or {})
        # The file passed alone, so what fails now is a flag's value.
        return cls.from_dict(merged, source="--eps-* flags")

    @classmethod
    def from_args(cls, args) -> "EPSConfig":
        """Build from an argparse namespace made by a parser extended with ``add_eps_args``.

        Order of precedence: explicit ``--eps-*`` flags > ``--eps-config`` file > defaults.
        ``enabled``: ``--eps-moe`` turns EPS on; without it, an ``--eps-config`` file decides
        (its ``enabled`` key, true when absent, as for every YAML), and with neither EPS is off.
        ``args.eps_config_flag`` (default ``--eps-config``) names the option that gave the file
        in error messages (the prefill tool reads the model config's ``eps:`` section).
        """
        overrides = flag_settings(args)
        path = getattr(args, "eps_config", None)
        if path:
            flag = getattr(args, "eps_config_flag", None) or "--eps-config"
            return cls.from_yaml(path, overrides=overrides, flag=flag)
        overrides.setdefault("enabled", False)
        return cls.from_dict(overrides, source="--eps-* flags")

    def replace(self, **changes) -> "EPSConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag_settings(args) -> Dict[str, Any]:
    """The settings that ``--eps-*`` flags in the namespace ``args`` give explicitly (flags left
    at None are absent), with ``enabled`` True where ``--eps-moe`` was given."""
    given = {}
    for arg_name, field_name in cli_fields().items():
        value = getattr(args, arg_name, None)
        if value is not None:
            given[field_name] = value
    if getattr(args, "eps_moe", False):
        given["enabled"] = True
    return given


def _check_pipeline_degree(value) -> Union[int, str]:
    # Exactly an int or "auto": text such as "2" is read into an int by parse_setting (the
    # command line) and by YAML itself, so a str here is a caller's mistake, not a spelling.
    if isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise EPSConfigError(
        f"eps pipeline_degree={value!r} is not allowed; allowed values: {Setting.ALLOWED['degree']}"
    )


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EPSConfigError(f"eps {name}={value!r} is not allowed; allowed values: integers >= 1")
    return value


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EPSConfigError(f"eps {name}={value!r} is not allowed; allowed values: integers >= 0")
    return value


def cli_fields() -> Dict[str, str]:
    """argparse dest -> EPSConfig field for the ``--eps-*`` value flags (``enabled`` is the
    ``--eps-moe`` switch). Flags left at None do not override the YAML file."""
    return {flag_of(name)[2:].replace("-", "_"): name for name in settings() if name != "enabled"}


_DEFAULTS = {f.name: f.default for f in fields(EPSConfig)}
