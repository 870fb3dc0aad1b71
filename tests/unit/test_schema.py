"""`nsfw schema` and `nsfw check` agree: on every shipped profile, the test suite's golden profiles, and a
corpus of bad profiles. Files named blind-*.yaml are mistakes a JSON Schema cannot see (host bits, a missing
include or list, a `remove:` that matches nothing, a reversed port range): the validator must still refuse them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nsfw import profile
from nsfw.schema import json_schema

jsonschema = pytest.importorskip("jsonschema")
ROOT = Path(__file__).resolve().parents[2]
BAD = sorted((ROOT / "tests" / "data" / "bad-profiles").glob("*.yaml"))
GOOD = sorted((ROOT / "profiles").glob("*.yaml")) + sorted((ROOT / "tests" / "golden" / "profiles").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> object:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _doc(path: Path) -> object:
    return yaml.load(path.read_text(), Loader=profile._Loader)  # the loader nsfw itself uses


@pytest.mark.parametrize("path", GOOD, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_good_profiles_pass_both(validator: object, path: Path) -> None:
    dirs = [path.parent, ROOT / "profiles"]
    assert profile.check([str(path)], dirs) == []
    assert list(validator.iter_errors(_doc(path))) == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_profiles_fail_both(validator: object, path: Path) -> None:
    assert profile.check([str(path)], [path.parent]), "nsfw check must refuse it"
    schema_errors = list(validator.iter_errors(_doc(path)))  # type: ignore[attr-defined]
    if path.stem.startswith("blind-"):
        assert not schema_errors, "documented as beyond a schema: if the schema now sees it, rename the file"
    else:
        assert schema_errors, "the schema accepts what nsfw check refuses"


def test_schema_knows_every_key_the_validator_knows() -> None:
    schema = json_schema()
    assert set(schema["properties"]) == set(profile.TOP_KEYS)
    rule = schema["$defs"]["rule"]["oneOf"][1]
    assert set(rule["properties"]) == set(profile.RULE_KEYS)
    assert rule["properties"]["zone"]["enum"] == list(profile.ZONES)
