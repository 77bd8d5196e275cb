//! Tiny Python wheels built on the spot, so that installing packages needs no network: a
//! requirements file reaches them with `--no-index --find-links`.

use std::path::Path;
use std::process::Command;

/// Python writing the wheel of a package whose module has `VERSION`, with the standard
/// library's zipfile.
const WRITE_WHEEL: &str = r#"
import sys, zipfile
name, version, out = sys.argv[1:]
info = f"{name}-{version}.dist-info"
files = {
    f"{name}/__init__.py": f"VERSION = {version!r}\n",
    f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: iac-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
with zipfile.ZipFile(f"{out}/{name}-{version}-py3-none-any.whl", "w") as z:
    for path, text in files.items():
        z.writestr(path, text)
    z.writestr(f"{info}/RECORD", "".join(f"{p},,\n" for p in [*files, f"{info}/RECORD"]))
"#;

/// Writes the wheel of the package `name` (one module, `name.VERSION == version`) into `dir`.
pub fn wheel(dir: &Path, name: &str, version: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let status = Command::new("python3")
        .args(["-c", WRITE_WHEEL, name, version])
        .arg(dir)
        .status()
        .expect("running python3");
    assert!(status.success(), "building the wheel of {name}");
}
