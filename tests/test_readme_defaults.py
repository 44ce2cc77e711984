"""The README's options tables say the defaults the config really has (they drifted before: the eval
table said 2 images per prompt, 20 sampler steps and no mid-run evaluation when the config had 8,
10 and every 100 steps)."""

from __future__ import annotations

import re

from omegaconf import OmegaConf

from tests.conftest import REPO, compose_config

# defaults the tables describe in words, because the value is a path or an interpolation
DESCRIBED = {
    "model.path": "–",
    "data.train_dir": "the sample set",
    "output.dir": "the Hydra run folder",
}
ROW = re.compile(r"^\| `(?P<key>[a-z_0-9]+\.[a-z_0-9.]+)` \| (?P<default>[^|]*) \|", re.MULTILINE)


def shown(value: object) -> str:
    """A config value written the way the tables write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(shown(v) for v in value) + "]"
    if value == "":
        return '""'
    return str(value)


def written(cell: str) -> str:
    return cell.strip().strip("`").replace(", ", ",").replace("'", "")


def test_every_documented_default_is_the_configs():
    config = OmegaConf.to_container(compose_config([]), resolve=False)
    rows = ROW.findall((REPO / "README.md").read_text())
    checked, wrong = 0, []
    for key, cell in rows:
        node: object = config
        for part in key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is KeyError:
            continue  # a key of another option file (optimizer=lion ...) or of the sweeper
        checked += 1
        if key in DESCRIBED:
            if cell.strip() != DESCRIBED[key]:
                wrong.append(f"{key}: README {cell.strip()!r}, expected the description {DESCRIBED[key]!r}")
            continue
        documented, actual = written(cell), shown(node)
        try:
            same = documented == actual or float(documented) == float(actual)
        except ValueError:
            same = False
        if not same:
            wrong.append(f"{key}: README says {cell.strip()}, the config has {actual}")
    assert checked > 80, checked  # the tables were found
    assert not wrong, "\n".join(wrong)
