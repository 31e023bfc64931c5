"Runs never rewrite the records shipped beside the artifacts, unless asked (`bankllm.config.record_path`)"
import hashlib

import pandas as pd

import bankllm.adapters.custom as custom
from bankllm.config import record_path
from bankllm.training import SHIPPED_VERSION, checkpoints_dir

SHIPPED = checkpoints_dir()/SHIPPED_VERSION/"dev_quality.json"

def _digest(p): return hashlib.sha256(p.read_bytes()).hexdigest()

async def _fake_goals(adapter, data_dir=None, progress=False, **kw):
    return pd.DataFrame([{"name": adapter.version, "bitext_topic": 0.5}])

async def test_evaluate_checkpoint_writes_a_scratch_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("BANKLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BANKLLM_UPDATE_SHIPPED", raising=False)
    monkeypatch.setattr(custom, "dev_goals", _fake_goals)
    before = _digest(SHIPPED)
    await custom.evaluate_checkpoint(SHIPPED_VERSION)
    assert _digest(SHIPPED) == before
    scratch = tmp_path/"scratch"/SHIPPED_VERSION/"dev_quality.json"
    assert scratch.is_file() and '"bitext_topic": 0.5' in scratch.read_text()

def test_record_path_updates_the_shipped_file_only_when_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("BANKLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BANKLLM_UPDATE_SHIPPED", raising=False)
    assert record_path(SHIPPED).is_relative_to(tmp_path)
    assert record_path(SHIPPED, update=True) == SHIPPED
    monkeypatch.setenv("BANKLLM_UPDATE_SHIPPED", "1")
    assert record_path(SHIPPED) == SHIPPED
    assert record_path(SHIPPED, update=False).is_relative_to(tmp_path)
