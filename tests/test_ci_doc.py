"""docs/CI.md: its workflow's `# pipeline` steps, run as written on a tiny synthetic model, build, verify,
record the sha256 and leave what the upload step publishes; and the doc's claim about byte-identical builds."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import make_synthetic as ms
import pytest
import yaml

from vkpack.compiler.build import build

DOC = Path(__file__).resolve().parent.parent / "docs" / "CI.md"


def workflow() -> dict:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) == 1, "docs/CI.md should hold exactly one workflow"
    wf = yaml.safe_load(blocks[0])
    return wf


def pipeline_steps(job: dict) -> list[dict]:
    """The steps the doc marks `# pipeline` (the YAML loader drops comments, so read names from the text)."""
    marked = set(re.findall(r"- name: (.+?)\s+# pipeline", DOC.read_text(encoding="utf-8")))
    return [s for s in job["steps"] if s.get("name") in marked]


def run_steps(steps: list[dict], env: dict[str, str], cwd: Path, outputs: dict[str, str]) -> list[int]:
    """Each step's `run` under `bash -e` (as GitHub runs it), `${{ }}` expressions filled in; their exit codes."""
    codes = []
    for step in steps:
        script = re.sub(r"\$\{\{\s*needs\.build\.outputs\.(\w+)\s*\}\}", lambda m: outputs[m.group(1)], step["run"])
        script = re.sub(r"\$\{\{\s*env\.(\w+)\s*\}\}", lambda m: env[m.group(1)], script)
        gh_out = cwd / "github_output"
        gh_out.write_text("")
        r = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env={**os.environ, **env, "GITHUB_OUTPUT": str(gh_out)},
                           capture_output=True, text=True, timeout=300)
        for line in gh_out.read_text().splitlines():
            k, _, v = line.partition("=")
            outputs[k] = v
        codes.append(r.returncode)
        if r.returncode != 0:
            break
    return codes


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return ms.write_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf", ms.Spec(), dtype="Q8_0", seed=3)


@pytest.fixture(scope="module")
def vkpack_on_path(tmp_path_factory) -> dict[str, str]:
    """PATH with a `vkpack` that is this checkout's (the workflow's `pip install .`)."""
    bindir = tmp_path_factory.mktemp("bin")
    exe = bindir / "vkpack"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m vkpack \"$@\"\n")
    exe.chmod(0o755)
    return {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_workflow_shape():
    wf = workflow()
    build_job, check_job = wf["jobs"]["build"], wf["jobs"]["check"]
    names = [s.get("name") for s in pipeline_steps(build_job)]
    assert names == ["Build", "Verify", "Record sha256"]
    uses = [s.get("uses", "") for s in build_job["steps"]]
    upload = next(s for s in build_job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert uses.index(upload["uses"]) == len(uses) - 1 and upload["with"]["path"] == "dist/"
    assert upload["with"]["if-no-files-found"] == "error"
    assert "--json" in pipeline_steps(build_job)[1]["run"]
    assert check_job["needs"] == "build" and [s["name"] for s in pipeline_steps(check_job)] == ["Check the published archive"]


def test_pipeline_builds_verifies_records_and_checks(tmp_path, model, vkpack_on_path):
    wf = workflow()
    job = wf["jobs"]["build"]
    shutil.copy(model, tmp_path / "model.gguf")
    env = {**{k: str(v) for k, v in job["env"].items()}, "MODEL": "model.gguf", **vkpack_on_path}
    outputs: dict[str, str] = {}
    assert run_steps(pipeline_steps(job), env, tmp_path, outputs) == [0, 0, 0]
    dist = tmp_path / "dist"
    archive = dist / f"{env['NAME']}.vkpack"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert outputs["sha256"] == digest
    assert (dist / f"{env['NAME']}.vkpack.sha256").read_text() == f"{digest}  {archive.name}\n"
    verify = json.loads((dist / "verify.json").read_text())
    assert verify["ok"] is True and verify["bad_packs"] == [] and verify["packs"] > 0
    assert json.loads((dist / "build.json").read_text())["packs"] == verify["packs"]

    # the check job, on what the upload step publishes (dist/), with the build job's output
    check = wf["jobs"]["check"]
    check_env = {**{k: str(v) for k, v in check["env"].items()}, **vkpack_on_path}
    assert run_steps(pipeline_steps(check), check_env, tmp_path, outputs) == [0]

    # a flipped byte in a pack: the recorded digest and verify both catch it
    data = bytearray(archive.read_bytes())
    data[4096 + 100] ^= 0xFF
    archive.write_bytes(bytes(data))
    assert run_steps(pipeline_steps(check), check_env, tmp_path, outputs) == [1]
    r = subprocess.run([sys.executable, "-m", "vkpack", "verify", str(archive), "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and json.loads(r.stdout)["bad_packs"]


def test_pipeline_fails_on_a_model_it_cannot_read(tmp_path, vkpack_on_path):
    job = workflow()["jobs"]["build"]
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(20))
    env = {**{k: str(v) for k, v in job["env"].items()}, "MODEL": "model.gguf", **vkpack_on_path}
    assert run_steps(pipeline_steps(job), env, tmp_path, {}) == [2]
    assert not list((tmp_path / "dist").glob("*.vkpack"))


def test_verify_exit_2_on_a_file_that_is_no_archive(tmp_path):
    p = tmp_path / "x.vkpack"
    p.write_bytes(b"not an archive" * 10)
    r = subprocess.run([sys.executable, "-m", "vkpack", "verify", str(p), "--json"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_byte_identical_only_for_the_same_file_name(tmp_path, model):
    # docs/CI.md: content, name, options and version fix the bytes; the folder and thread count do not
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(model, a / "m.gguf")
    shutil.copy(model, b / "m.gguf")
    shutil.copy(model, b / "other.gguf")
    build(a / "m.gguf", a / "out.vkpack", progress=False, threads=1)
    build(b / "m.gguf", b / "out.vkpack", progress=False, threads=2)
    build(b / "other.gguf", b / "other.vkpack", progress=False)
    same, renamed = (a / "out.vkpack").read_bytes(), (b / "other.vkpack").read_bytes()
    assert same == (b / "out.vkpack").read_bytes()
    assert same != renamed
    from vkpack.pack_format.reader import Archive

    with Archive(a / "out.vkpack") as x, Archive(b / "other.vkpack") as y:
        fx, fy = x.index["source"]["files"], y.index["source"]["files"]
        assert [f["name"] for f in fx] == ["m.gguf"] and [f["name"] for f in fy] == ["other.gguf"]
        assert [f["sha256"] for f in fx] == [f["sha256"] for f in fy]
        assert {k: v for k, v in x.index.items() if k != "source"} == {k: v for k, v in y.index.items() if k != "source"}
