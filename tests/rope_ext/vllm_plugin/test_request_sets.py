"""Each engine request carries its set and a per-set prefix-cache salt (rope_ext/vllm_plugin/request_sets.py)."""

import pytest

from rope_ext.vllm_plugin.request_sets import salt_for


@pytest.mark.unit
def test_salt_separates_sets_and_keeps_the_clients():
    """Every (set, client salt) pair has its own prefix-cache salt, the same on every call, which keeps the
    client's salt whole (so tenants stay apart inside one set as they do in stock vLLM)."""
    pairs = [(name, client) for name in ("short", "mid", "long") for client in (None, "tenant-a", "tenant-b")]
    salts = [salt_for(name, client) for name, client in pairs]
    assert len(set(salts)) == len(pairs)
    assert salts == [salt_for(name, client) for name, client in pairs]
    assert all(client in salt for (_, client), salt in zip(pairs, salts) if client)
    assert salt_for("short", "") == salt_for("short", None)  # an empty salt is vLLM's "no salt"
