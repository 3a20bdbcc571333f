"""EPSConfig: the one place where megatron-eps settings are declared, parsed and validated."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Union

EXPERT_KERNELS = ("auto", "grouped", "dense", "triton", "te", "megatron")
"""Allowed ``expert_kernel`` values.

auto     -- pick per load from the cost table (megatron_eps.experts.selector)
grouped  -- torch._grouped_mm (CUTLASS grouped GEMM)
dense    -- one cuBLAS GEMM per expert
triton   -- megatron-eps' own Triton grouped GEMM
te       -- Transformer Engine GroupedLinear (only when transformer_engine imports)
megatron -- call the layer's own Megatron experts module (SequentialMLP / TEGroupedMLP)
"""

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


class EPSConfigError(ValueError):
    """A megatron-eps setting has a value that is not allowed. The message names both."""


@dataclass
class EPSConfig:
    """Settings of the EPS-MoE expert pipeline scheduler.

    Attributes:
        enabled: master switch (``--eps-moe``). When False, EPSMoELayer runs the stock forward.
        pipeline_degree: number of chunks N the routed tokens of a layer are split into, an
            int >= 1, or ``"auto"`` to choose N per forward from the cost model. N is clamped to
            the number of local experts (a chunk is a group of local experts).
        expert_kernel: expert GEMM backend, one of EXPERT_KERNELS.
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
        transport: how chunks travel between EP ranks, one of TRANSPORTS.
    """

    enabled: bool = True
    pipeline_degree: Union[int, str] = "auto"
    expert_kernel: str = "auto"
    min_tokens_to_pipeline: int = 2048
    cost_profile: Optional[str] = None
    chunk_split: str = "auto"
    max_pipeline_degree: int = 16
    comm_num_ctas: Optional[int] = None
    gemm_sm_carveout: Optional[int] = None
    transport: str = "auto"

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "EPSConfig":
        """Raise EPSConfigError naming the setting and the allowed values if anything is off."""
        if not isinstance(self.enabled, bool):
            raise EPSConfigError(f"eps enabled must be true or false, got {self.enabled!r}")
        self.pipeline_degree = _parse_pipeline_degree(self.pipeline_degree)
        if self.expert_kernel not in EXPERT_KERNELS:
            raise EPSConfigError(
                f"eps expert_kernel={self.expert_kernel!r} is not allowed; "
                f"allowed values: {', '.join(EXPERT_KERNELS)}"
            )
        self.min_tokens_to_pipeline = _non_negative_int(
            "min_tokens_to_pipeline", self.min_tokens_to_pipeline
        )
        if self.chunk_split not in CHUNK_SPLITS:
            raise EPSConfigError(
                f"eps chunk_split={self.chunk_split!r} is not allowed; "
                f"allowed values: {', '.join(CHUNK_SPLITS)}"
            )
        self.max_pipeline_degree = _positive_int("max_pipeline_degree", self.max_pipeline_degree)
        if self.transport not in TRANSPORTS:
            raise EPSConfigError(
                f"eps transport={self.transport!r} is not allowed; "
                f"allowed values: {', '.join(TRANSPORTS)}"
            )
        if self.comm_num_ctas is not None:
            self.comm_num_ctas = _positive_int("comm_num_ctas", self.comm_num_ctas)
        if self.gemm_sm_carveout is not None:
            self.gemm_sm_carveout = _non_negative_int("gemm_sm_carveout", self.gemm_sm_carveout)
        if self.cost_profile is not None:
            if not isinstance(self.cost_profile, (str, os.PathLike)):
                raise EPSConfigError(
                    f"eps cost_profile must be a file path or null, got {self.cost_profile!r}"
                )
            self.cost_profile = os.fspath(self.cost_profile)
            if not os.path.isfile(self.cost_profile):
                raise EPSConfigError(
                    f"eps cost_profile={self.cost_profile!r}: no such file "
                    "(write one with megatron-eps-calibrate, or leave it unset)"
                )
        return self

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
        allowed = cls.field_names()
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise EPSConfigError(
                f"{source}: unknown eps key(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys: {', '.join(allowed)}"
            )
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike], overrides: Optional[Mapping] = None):
        """Read a YAML file holding either the EPS keys at top level or under an ``eps:`` key.

        A model config file (configs/*.yaml) keeps its EPS settings in an ``eps:`` section; a
        pure EPS file holds the keys directly. ``overrides`` (e.g. explicit command-line flags)
        win over the file.
        """
        import yaml

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise EPSConfigError(f"--eps-config {path!r}: no such file")
        with open(path) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise EPSConfigError(f"--eps-config {path!r} is not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise EPSConfigError(
                f"--eps-config {path!r}: expected a mapping at top level, got {type(data).__name__}"
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
            raise EPSConfigError(f"--eps-config {path!r}: 'eps' must be a mapping")
        merged = dict(section)
        merged.update(overrides or {})
        return cls.from_dict(merged, source=f"--eps-config {path!r}")

    @classmethod
    def from_args(cls, args) -> "EPSConfig":
        """Build from an argparse namespace made by a parser extended with ``add_eps_args``.

        Order of precedence: explicit ``--eps-*`` flags > ``--eps-config`` file > defaults.
        """
        from megatron_eps.arguments import ARG_TO_FIELD

        overrides = {}
        for arg_name, field_name in ARG_TO_FIELD.items():
            value = getattr(args, arg_name, None)
            if value is not None:
                overrides[field_name] = value
        enabled = bool(getattr(args, "eps_moe", False))
        overrides["enabled"] = enabled
        path = getattr(args, "eps_config", None)
        if path:
            return cls.from_yaml(path, overrides=overrides)
        return cls.from_dict(overrides, source="--eps-* flags")

    def replace(self, **changes) -> "EPSConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_pipeline_degree(value) -> Union[int, str]:
    allowed = "an integer >= 1 or 'auto'"
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = int(text)
        except ValueError:
            raise EPSConfigError(
                f"eps pipeline_degree={value!r} is not allowed; allowed values: {allowed}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise EPSConfigError(
                f"eps pipeline_degree={value!r} is not allowed; allowed values: {allowed}"
            )
    if value < 1:
        raise EPSConfigError(
            f"eps pipeline_degree={value!r} is not allowed; allowed values: {allowed}"
        )
    return value


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EPSConfigError(f"eps {name}={value!r} is not allowed; allowed values: integers >= 1")
    return value


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EPSConfigError(f"eps {name}={value!r} is not allowed; allowed values: integers >= 0")
    return value
