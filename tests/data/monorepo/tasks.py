"""Root invoke collection of the fixture monorepo: one namespace per service with a deploy.py.

platform/{nn}.{name}/deploy.py            -> {name}.sync
finance_report/finance_report/{nn}.{name}/deploy.py -> fr-{name}.sync
bootstrap/{nn}.{name}/deploy.py           -> {name}.sync (exists, must never run from a push)
"""

import importlib.util
import pathlib

from invoke import Collection

ROOT = pathlib.Path(__file__).resolve().parent
ns = Collection()


def _load(deploy_py: pathlib.Path, namespace: str) -> None:
    spec = importlib.util.spec_from_file_location(f"deploy_{namespace}", deploy_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ns.add_collection(Collection.from_module(module, name=namespace))


def _name(service_dir: pathlib.Path) -> str:
    return service_dir.name.split(".", 1)[-1]


for deploy in sorted(ROOT.glob("platform/*/deploy.py")):
    _load(deploy, _name(deploy.parent))
for deploy in sorted(ROOT.glob("finance_report/finance_report/*/deploy.py")):
    _load(deploy, "fr-" + _name(deploy.parent))
for deploy in sorted(ROOT.glob("bootstrap/*/deploy.py")):
    _load(deploy, _name(deploy.parent))
