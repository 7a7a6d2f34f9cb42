"""service.heap: the glibc thresholds that stop per-request arrays from page-faulting."""

from __future__ import annotations

import platform

import pytest

from service.heap import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_applies_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert keep_freed_memory(256) is True


def test_zero_leaves_the_defaults() -> None:
    assert keep_freed_memory(0) is False


def test_an_explicit_glibc_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory(256) is False


def test_two_gib_and_more_is_refused_not_wrapped() -> None:
    """mallopt takes a C int of bytes: 4096 MiB used to wrap to 0 (trim on every free)."""
    from pydantic import ValidationError

    from service.heap import MAX_KEEP_MB
    from service.settings import ServiceSettings

    assert MAX_KEEP_MB == 2047
    with pytest.raises(ValueError, match="2047"):
        keep_freed_memory(4096)
    with pytest.raises(ValidationError):
        ServiceSettings(heap_keep_mb=4096)
    assert ServiceSettings(heap_keep_mb=2047).heap_keep_mb == 2047
