"""How one video is split over several processes (GPUs): CFG parallel x sequence parallel."""

from __future__ import annotations

from dataclasses import dataclass

from qc_compile.errors import UserError

MODES = ("auto", "cfg", "sequence")


@dataclass(frozen=True)
class ParallelConfig:
    """``cfg_parallel``: the two halves of the CFG batch ([cond; null]) on two process groups; ``sp_size``: the tokens
    of each half split over that many processes (Open-Sora's dynamic sequence parallelism for STDiT3). The world is
    ``(2 if cfg_parallel else 1) * sp_size`` processes; rank ``= cfg_rank * sp_size + sp_rank``."""

    cfg_parallel: bool = False
    sp_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.sp_size, int) or self.sp_size < 1:
            raise UserError(f"sequence-parallel size must be a positive integer, got {self.sp_size!r}.")

    @property
    def cfg_size(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def world_size(self) -> int:
        return self.cfg_size * self.sp_size

    @classmethod
    def for_gpus(cls, gpus: int, mode: str = "auto") -> "ParallelConfig":
        """``--gpus N --parallel MODE``: ``cfg`` needs N = 2; ``sequence`` splits tokens over all N; ``auto`` takes CFG
        parallel first (no communication inside a step) when N is even, and splits tokens over the rest."""
        if not isinstance(gpus, int) or gpus < 1:
            raise UserError(f"--gpus must be a positive integer, got {gpus!r}.")
        if mode not in MODES:
            raise UserError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}.")
        if mode == "cfg":
            if gpus != 2:
                raise UserError(f"--parallel cfg splits the two CFG branches over exactly 2 GPUs, got --gpus {gpus}; "
                                "use --parallel auto (CFG x sequence) or sequence for other counts.")
            return cls(True, 1)
        if mode == "sequence" or gpus % 2:
            return cls(False, gpus)
        return cls(True, gpus // 2)

    def describe(self) -> dict:
        return {"world_size": self.world_size, "cfg_parallel": self.cfg_parallel, "sp_size": self.sp_size}
