"""Placeholder until the guest-kernel runner lands: no run lives in a guest yet."""


def owns_run(run_id: str | None) -> bool:
    return False


def forward(argv: list[str]) -> int:
    raise RuntimeError("--kernel uml is not available in this version of svcbench")
