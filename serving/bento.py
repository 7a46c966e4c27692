"""A Bento of the personalization API: the service, its code and its champions in one deployable unit.

    personalize bento build [--models churn,propensity]      # then: bentoml containerize <tag>

Building takes three steps, each its own function here:

- :func:`import_champion` copies a registered model's champion into the BentoML model store
  (``bentoml.mlflow.import_model``), tagged ``personalize-<name>:v<version>-<run id>`` (the same champion is
  imported once), labelled with the registered name, version, alias and run, and carrying the held-out frame the
  server takes its cold-start priors and count checks from (a custom object: the Parquet bytes).
- :func:`bentofile` is the build file: the service, the repository's packages and YAML catalogs, pinned Python
  requirements (:func:`pinned_requirements`: the versions this environment runs, so the build needs no network;
  or the lines of a requirements file, e.g. a ``uv export`` of the lock), the imported models.
- :func:`build` imports the models, writes the file and runs ``bentoml build``.

At run time :class:`BentoRegistry` stands in for the MLflow registry: it answers the two look-ups
:func:`serving.scoring.load` makes (a version by alias or by number) from the models' labels and loads the pyfunc
(``bentoml.mlflow.load_model``) and the held-out frame from the model store, so a container needs no registry.
A Bento's models are fixed when it is built: there is nothing to hot-reload (a new champion is a new Bento).
"""

from __future__ import annotations

import importlib.metadata as metadata
import io
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import yaml

from personalize.errors import PersonalizeError

log = logging.getLogger(__name__)

SERVICE = "serving.service:Personalization"
BENTO_NAME = "personalization"  # the service's name in @bentoml.service
MODEL_PREFIX = "personalize-"
HELDOUT_OBJECT = "heldout.parquet"  # the custom object holding the held-out frame's Parquet bytes
# what the service imports at run time, relative to the build context (the folder holding these packages)
PACKAGES = ("personalize", "features", "serving", "training", "monitoring")
SYSTEM_PACKAGES = ("libgomp1",)  # OpenMP, which the LightGBM and XGBoost wheels link against
CONTAINER_HOME = "/home/bentoml/personalize"  # PERSONALIZE_HOME in the image: mount the home (or a volume) here
# the Bento's labels that say how it serves (read by the service, so `bentoml serve <tag>` needs no environment):
# which model an endpoint serves where it is not the default, and the alias its models were carried as
ENDPOINTS_LABEL = "personalize.endpoints"
ALIAS_LABEL = "personalize.alias"


def model_tag(name: str, version: str, run_id: str) -> str:
    """The BentoML tag of a registered model version: ``personalize-<name>:v<version>-<run id prefix>``."""
    return f"{MODEL_PREFIX}{name.lower()}:v{version}-{run_id[:12]}"


# --- build ---------------------------------------------------------------------------------------------------------
class NoVersion(PersonalizeError):
    """The registry has no version of the model under the alias."""


@dataclass(frozen=True)
class Imported:
    name: str  # the registered model
    version: str
    alias: str
    tag: str
    reused: bool  # already in the BentoML model store (imported by an earlier build)


def import_champion(client: Any, name: str, alias: str = "champion") -> Imported:
    """Copy ``models:/<name>@<alias>`` (the version it points to now) into the BentoML model store, with its held-out
    frame; a version imported before is reused. Raises :class:`NoVersion` when the alias points nowhere."""
    import bentoml
    import bentoml.mlflow
    import mlflow
    from bentoml.exceptions import NotFound
    from mlflow.exceptions import MlflowException

    from personalize.settings import redact

    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise NoVersion(f"no {name}@{alias} in the registry ({str(exc).splitlines()[0][:160]})") from None
    version, run_id = str(mv.version), str(mv.run_id)
    tag = model_tag(name, version, run_id)
    try:
        bentoml.models.get(tag)
        return Imported(name, version, alias, tag, reused=True)
    except NotFound:
        pass
    heldout = _heldout_bytes(run_id)
    bentoml.mlflow.import_model(
        tag, model_uri=f"models:/{name}/{version}",  # the resolved version: the alias may move meanwhile
        labels={"registered_model": name, "version": version, "alias": alias, "run_id": run_id},
        custom_objects={HELDOUT_OBJECT: heldout} if heldout is not None else None,
        metadata={"registry": redact(mlflow.get_registry_uri()),
                  "model_uri": f"models:/{name}@{alias}", "heldout": heldout is not None})
    log.info("imported %s version %s (%s) as %s", name, version, alias, tag)
    return Imported(name, version, alias, tag, reused=False)


def _heldout_bytes(run_id: str) -> bytes | None:
    import mlflow.artifacts

    from training.registry import HELDOUT_ARTIFACT

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=HELDOUT_ARTIFACT, dst_path=tmp)
        except Exception:  # a model logged without one: served with no prior and no count checks, as from the registry
            return None
        return Path(path).read_bytes()


def pinned_requirements(project: str = "personalize",
                        leave_out: Iterable[str] = ("personalize", "bentoml")) -> list[str]:
    """``name==version`` for every distribution the project needs at run time (its dependencies, their extras and
    theirs, markers evaluated here), as installed in this environment: the versions the tests ran with, pinned
    without a resolver or a network. BentoML pins itself; the project ships as source."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wanted: dict[str, set[str]] = {}
    todo: list[tuple[str, frozenset[str]]] = [(project, frozenset())]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in wanted and extras <= wanted[key]:
            continue
        wanted.setdefault(key, set()).update(extras)
        environments = [{"extra": e} for e in (wanted[key] or {""})]
        for line in metadata.distribution(key).requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((req.name, frozenset(req.extras)))
    skip = {canonicalize_name(n) for n in leave_out}
    return sorted(f"{n}=={metadata.version(n)}" for n in wanted if n not in skip)


def requirement_lines(text: str, leave_out: Iterable[str] = ("personalize", "bentoml")) -> list[str]:
    """The requirements of a requirements file (``uv export``, ``pip freeze``): no comments, options, hashes or
    line continuations, and not the project or BentoML (which pins itself)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    skip = {canonicalize_name(n) for n in leave_out}
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        line = " ".join(w for w in line.split() if not w.startswith("--hash"))
        if canonicalize_name(Requirement(line).name) not in skip:
            out.append(line)
    return out


def bentofile(models: list[str], requirements: list[str], labels: dict[str, str] | None = None,
              endpoints: dict[str, str] | None = None) -> dict[str, Any]:
    """The build file of the personalization Bento: the service, the packages it runs, pinned requirements (listed
    inline, not locked again at build: that would need an index), the champions' tags, and which model an endpoint
    serves where it is not the default (``PERSONALIZE_MODELS``)."""
    envs = [{"name": "PERSONALIZE_HOME", "value": CONTAINER_HOME}, {"name": "BENTOML_DO_NOT_TRACK", "value": "True"}]
    if endpoints:
        envs.append({"name": "PERSONALIZE_MODELS", "value": ",".join(f"{k}={v}" for k, v in endpoints.items())})
    return {
        "service": SERVICE,
        "name": BENTO_NAME,
        "description": "The personalization API with its champions built in (personalize bento build).",
        "labels": dict(labels or {}),
        "include": [f"{p}/**/*.py" for p in PACKAGES] + [f"{p}/**/*.yaml" for p in PACKAGES],
        "exclude": ["**/__pycache__/", "tests/", ".venv/"],
        "python": {"packages": list(requirements), "lock_packages": False},
        "docker": {"distro": "debian", "system_packages": list(SYSTEM_PACKAGES)},
        "envs": envs,
        "models": list(models),
    }


@dataclass(frozen=True)
class BuildReport:
    bentofile: Path
    models: list[Imported]
    tag: str | None = None  # None: the build file was written, not built
    missing: dict[str, str] = field(default_factory=dict)  # model -> why it is not in the Bento

    @property
    def containerize(self) -> str | None:
        return f"bentoml containerize {self.tag}" if self.tag else None


def source_root() -> Path:
    """The folder holding this repository's packages: the Bento's build context."""
    return Path(__file__).resolve().parents[1]


def build(client: Any, names: Iterable[str], out_dir: Path, alias: str = "champion", required: bool = False,
          requirements: Path | None = None, run_build: bool = True, build_ctx: Path | None = None,
          endpoints: dict[str, str] | None = None) -> BuildReport:
    """Import each model's ``alias`` version, write ``bentofile.yaml`` into ``out_dir`` (requirements pinned from
    this environment, or read from ``requirements``) and build the Bento (``run_build``). A model with no such version
    is left out (the API answers 503 for it) unless ``required``; with none at all there is nothing to build.
    ``endpoints`` (``{"churn": "churn_telco"}``) is written into the Bento's environment: which model an endpoint
    serves where it is not the default."""
    names = list(names)
    if run_build:
        _check_uv()
    imported, missing = [], {}
    for name in names:
        try:
            imported.append(import_champion(client, name, alias))
        except NoVersion as exc:
            if required or name in (endpoints or {}).values():  # an endpoint named for it would never be ready
                raise
            missing[name] = str(exc)
            log.warning("%s: left out of the Bento", exc)
    if not imported:
        raise PersonalizeError(f"none of {', '.join(names)} has a version with the alias {alias!r}: nothing to build")
    pins = requirement_lines(requirements.read_text()) if requirements is not None else pinned_requirements()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bentofile.yaml"
    labels = {m.name: m.version for m in imported} | {ALIAS_LABEL: alias}
    if endpoints:
        labels[ENDPOINTS_LABEL] = ",".join(f"{k}={v}" for k, v in endpoints.items())
    spec = bentofile([m.tag for m in imported], pins, labels, endpoints)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    if not run_build:
        return BuildReport(path, imported, None, missing)
    import bentoml

    bento = bentoml.bentos.build_bentofile(str(path), build_ctx=str(build_ctx or source_root()))
    log.info("built %s with %s", bento.tag, ", ".join(m.tag for m in imported))
    return BuildReport(path, imported, str(bento.tag), missing)


def _check_uv() -> None:
    """BentoML 1.4 writes a Bento's requirements with uv (and, without one, tries to pip-install it)."""
    import shutil

    if shutil.which("uv") is None:
        try:
            metadata.version("uv")
        except metadata.PackageNotFoundError:
            raise PersonalizeError("`bentoml build` needs uv on PATH (it writes the Bento's requirements with it): "
                                   "install uv, or use --no-build and build where uv is") from None


# --- serve -----------------------------------------------------------------------------------------------------------
class BentoRegistry:
    """The champions in the BentoML model store, answering what :func:`serving.scoring.load` asks a registry.

    One model per registered name: the Bento's own (:meth:`of_bento`) or the last imported (:meth:`latest`)."""

    def __init__(self, models: Iterable[Any], alias: str | None = None) -> None:
        self.alias = alias  # the alias every model answers to (a Bento's); None: each model's own label
        self.models: dict[str, Any] = {}
        for model in models:
            name = model.info.labels.get("registered_model")
            if name and model.info.module in ("bentoml.mlflow", "_bentoml_impl.frameworks.mlflow"):
                self.models[name] = model

    @classmethod
    def of_bento(cls, bento: Any) -> BentoRegistry:
        """The models a Bento lists (read from the model store it is served with: its own in a container)."""
        import bentoml

        return cls((bentoml.models.get(m.tag) for m in bento.info.all_models
                    if str(m.tag.name).startswith(MODEL_PREFIX)), bento.info.labels.get(ALIAS_LABEL))

    @classmethod
    def latest(cls) -> BentoRegistry:
        """The last imported version of each registered model in the BentoML model store."""
        import bentoml

        ours = sorted((m for m in bentoml.models.list() if str(m.tag.name).startswith(MODEL_PREFIX)),
                      key=lambda m: m.info.creation_time)
        return cls(ours)

    def _model(self, name: str) -> Any:
        model = self.models.get(name)
        if model is None:
            raise LookupError(f"{name} is not in the Bento (it carries {', '.join(sorted(self.models)) or 'none'})")
        return model

    def _version(self, name: str) -> SimpleNamespace:
        labels = self._model(name).info.labels
        # a Bento's own alias, not the model's label: a version first imported as the challenger and since promoted
        # is reused by a champion Bento with its old label
        alias = self.alias or labels.get("alias", "champion")
        return SimpleNamespace(name=name, version=labels["version"], run_id=labels.get("run_id", ""),
                               aliases=[alias])

    def get_model_version_by_alias(self, name: str, alias: str) -> SimpleNamespace:
        mv = self._version(name)
        if alias not in mv.aliases:
            raise LookupError(f"the Bento carries {name} version {mv.version} as {mv.aliases[0]!r}, not {alias!r}")
        return mv

    def get_model_version(self, name: str, version: str) -> SimpleNamespace:
        mv = self._version(name)
        if str(version) != mv.version:
            raise LookupError(f"the Bento carries {name} version {mv.version}, not {version}")
        return mv

    def load_pyfunc(self, name: str, version: str) -> Any:
        import bentoml.mlflow

        return bentoml.mlflow.load_model(self._model(name))

    def heldout(self, name: str, version: str) -> pd.DataFrame | None:
        raw = self._model(name).custom_objects.get(HELDOUT_OBJECT)
        return None if raw is None else pd.read_parquet(io.BytesIO(raw))

    def describe(self) -> dict[str, str]:
        """Registered model -> BentoML tag."""
        return {name: str(m.tag) for name, m in sorted(self.models.items())}


def bento_serving(bento: Any) -> tuple[dict[str, str], str | None]:
    """How a Bento serves, from its labels: which model an endpoint serves where it is not the default, and the alias
    its models were carried as (None: built before these were recorded)."""
    from serving.config import endpoint_models

    labels = dict(bento.info.labels or {}) if bento is not None else {}
    endpoints = labels.get(ENDPOINTS_LABEL)
    return (endpoint_models(endpoints.split(",")) if endpoints else {}), labels.get(ALIAS_LABEL)
