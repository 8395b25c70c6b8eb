"""Talking to the Hugging Face hub plainly: fail fast offline, no per-load progress bars."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from saediff.errors import SaediffError

log = logging.getLogger(__name__)
TRUE = ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" bar per model load, and no deprecation noise PEFT triggers inside
    transformers, unless saediff logs at DEBUG (`--verbose`)."""
    from transformers.utils import logging as tf_logging

    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    was_on = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            yield
    finally:
        if was_on:
            tf_logging.enable_progress_bar()


def hub_local_only(name: str, what: str = "model") -> bool:
    """For a hub name: whether to load from the local HF cache only. Checks once, fast, that
    the hub answers: offline, a name that is cached loads from the cache, and one that is not
    fails at once in one line (instead of the hub client's retries, ~50 s of them)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if Path(name).exists():
        return True
    try:
        cached = isinstance(try_to_load_from_cache(
            name, "adapter_config.json" if what == "adapter" else "config.json"), str)
    except ValueError:  # not a valid repo id: let the loader word it
        return False
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE
    if offline:
        reachable = False
    else:
        url = urlparse(constants.ENDPOINT)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "", port), timeout=5).close()
            reachable = True
        except OSError:
            reachable = False
    if reachable or cached:
        return not reachable
    why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} is unreachable"
    raise SaediffError(f"cannot load {what} {name!r}: {why} and it is not in the local Hugging "
                       f"Face cache; download it where there is network (`hf download {name}`) "
                       "or give a local directory")
