"""Shared deploy logic of the example services: deploy only when the config hash changed.

The hash covers compose.yaml and the service's environment file (if any). A real monorepo
stores it as IAC_CONFIG_HASH in Dokploy; this example keeps it in $IAC_EXAMPLE_STATE (a
directory outside the checkout) and "deploys" by printing what it would send to Dokploy,
under a deployment id from `uuid` (which needs the standard library's `platform`, not the
repository's `platform/` package).
"""

import hashlib
import os
import pathlib
import uuid


def config_hash(service_dir: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for name in ("compose.yaml", ".env.example"):
        path = service_dir / name
        if path.exists():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def sync(deploy_file: str) -> None:
    service_dir = pathlib.Path(deploy_file).resolve().parent
    service = os.environ.get("IAC_SERVICE", service_dir.name)
    state_dir = pathlib.Path(os.environ.get("IAC_EXAMPLE_STATE", "/tmp/iac-example-state"))
    state_dir.mkdir(parents=True, exist_ok=True)
    state = state_dir / (service.replace("/", "__") + ".hash")
    new_hash = config_hash(service_dir)
    old_hash = state.read_text().strip() if state.exists() else None
    if old_hash == new_hash and os.environ.get("IAC_FORCE") != "1":
        print(f"{service}: config hash unchanged ({new_hash[:12]}), skipping deploy")
        return
    deployment = uuid.uuid4()
    print(f"{service}: deploying compose.yaml to Dokploy (hash {new_hash[:12]}, deployment {deployment})")
    state.write_text(new_hash)
    print(f"{service}: deployed")
