"""The README's option tables are generated from ModelConfig and the registries: keep them fresh."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_option_tables_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_option_tables.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_model_option_is_in_the_readme():
    from forge_dist.config.model_config import ModelConfig

    readme = (ROOT / "README.md").read_text()
    missing = [n for n in ModelConfig.field_names() if f"`{n}`" not in readme]
    assert not missing, f"options missing from README.md: {missing}"
