"""Print the licence of every installed distribution; exit 1 when one is GPL or AGPL.

Run with the interpreter of the environment to check (CI: the clean venv of the default
install, `.ci/install_check`). The licence is read from the package metadata: License-Expression
(PEP 639) first, then the Trove "License ::" classifiers, then the free-text License field.
LGPL is not GPL here (it allows linking from MIT code); "GPL-compatible" classifiers are not GPL.
Packaging tools of the venv itself (pip, setuptools) are left out: they are not ich's.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

SKIP = {"pip", "setuptools", "wheel"}
# GPL or AGPL, any version, but not LGPL and not "GPL compatible".
COPYLEFT = re.compile(r"(?<![L\w])(A?GPL|GNU (Affero )?General Public)(?!.{0,3}compatible)", re.I)


def licence(dist: importlib.metadata.Distribution) -> str:
    """The best licence statement the metadata of `dist` has."""
    meta = dist.metadata
    expression = meta.get("License-Expression")
    if expression:
        return expression.strip()
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                   if c.startswith("License ::")]
    if classifiers:
        return "; ".join(classifiers)
    text = (meta.get("License") or "").strip()
    # Some packages paste the whole licence text into the field: keep its first line.
    return text.splitlines()[0][:80] if text else "UNKNOWN"


def main() -> int:
    """Print name, version and licence of each distribution; 1 if any is GPL/AGPL."""
    rows = sorted({(d.metadata["Name"], d.version, licence(d))
                   for d in importlib.metadata.distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower() not in SKIP},
                  key=lambda row: row[0].lower())
    width = max(len(name) for name, _, _ in rows)
    bad = []
    for name, version, text in rows:
        flag = "  <- GPL/AGPL" if COPYLEFT.search(text) else ""
        if flag:
            bad.append(name)
        print(f"{name:<{width}}  {version:<14} {text}{flag}")
    unknown = [name for name, _, text in rows if text == "UNKNOWN"]
    if unknown:
        print(f"licences: no licence metadata for {', '.join(unknown)}: check by hand "
              f"(docs/dependencies.md)")
    if bad:
        print(f"licences: GPL/AGPL in the default install: {', '.join(bad)}")
        return 1
    print(f"licences: {len(rows)} distributions, none GPL/AGPL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
