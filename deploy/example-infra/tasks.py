"""Root invoke collection of the example infrastructure monorepo.

Every service directory with a deploy.py becomes an invoke namespace:
  platform/{nn}.{name}/                    -> {name}.sync
  finance_report/finance_report/{nn}.{name}/ -> fr-{name}.sync
  bootstrap/{nn}.{name}/                   -> {name}.sync (run by hand only, never by the runner)
"""

import importlib.util
import pathlib

from invoke import Collection

ROOT = pathlib.Path(__file__).resolve().parent
ns = Collection()


def _add(deploy_py: pathlib.Path, namespace: str) -> None:
    spec = importlib.util.spec_from_file_location(f"deploy_{namespace}", deploy_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ns.add_collection(Collection.from_module(module, name=namespace))


def _name(service_dir: pathlib.Path) -> str:
    return service_dir.name.split(".", 1)[-1]


for deploy in sorted(ROOT.glob("platform/*/deploy.py")):
    _add(deploy, _name(deploy.parent))
for deploy in sorted(ROOT.glob("finance_report/finance_report/*/deploy.py")):
    _add(deploy, "fr-" + _name(deploy.parent))
for deploy in sorted(ROOT.glob("bootstrap/*/deploy.py")):
    _add(deploy, _name(deploy.parent))
