"""SBOM documents (CycloneDX JSON, SPDX JSON) reduced to the components we index.

Pure: bytes in, a :class:`Sbom` out, or :class:`~corral.errors.InvalidInput` naming what is
wrong (the JSON path of the bad field). Only what the supply-chain query needs is kept per
component (name, version, purl, type); the format and its version are recorded with the artifact.

- CycloneDX: ``bomFormat == "CycloneDX"``, ``components[]`` with ``name``, ``version``,
  ``purl``, ``type``; nested ``components`` (a component's sub-components) are included.
- SPDX: ``spdxVersion`` (``SPDX-2.x``), ``packages[]`` with ``name``, ``versionInfo`` and an
  ``externalRefs[]`` entry of ``referenceType == "purl"`` (``referenceLocator``); ``type`` is the
  package's ``primaryPackagePurpose`` when given.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from corral.errors import InvalidInput

MAX_NAME = 256
MAX_VERSION = 128
MAX_TYPE = 32
MAX_PURL = 2048


@dataclass(frozen=True)
class Component:
    name: str
    version: str | None
    purl: str | None
    type: str | None


@dataclass(frozen=True)
class Sbom:
    format: str  # "CycloneDX 1.5", "SPDX-2.3"
    components: list[Component]


def parse(data: bytes, max_components: int) -> Sbom:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"SBOM is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidInput("SBOM must be a JSON object (a CycloneDX or SPDX document)")
    if doc.get("bomFormat") == "CycloneDX":
        fmt = f"CycloneDX {_text(doc.get('specVersion'), 'specVersion', 16) or '?'}"
        raw = doc.get("components", [])
        components = list(_cyclonedx(raw, max_components))
    elif isinstance(doc.get("spdxVersion"), str) and doc["spdxVersion"].startswith("SPDX-"):
        fmt = _text(doc["spdxVersion"], "spdxVersion", 16) or "SPDX"
        components = list(_spdx(doc.get("packages", []), max_components))
    else:
        raise InvalidInput('SBOM format not recognised: need CycloneDX JSON (bomFormat "CycloneDX") '
                           'or SPDX JSON (spdxVersion "SPDX-2.x")')
    return Sbom(format=fmt, components=components)


def _text(value: Any, where: str, max_len: int, required: bool = False) -> str | None:
    if value is None or value == "":
        if required:
            raise InvalidInput(f"SBOM {where} is missing")
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"SBOM {where} must be a string")
    if len(value) > max_len:
        raise InvalidInput(f"SBOM {where} is longer than {max_len} characters")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"SBOM {where} must be a list")
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"SBOM {where} must be an object")
    return value


def _count(n: int, max_components: int) -> None:
    if n > max_components:
        raise InvalidInput(f"SBOM has more than {max_components} components")


def _cyclonedx(raw: Any, max_components: int) -> Iterator[Component]:
    """Every component, a component's own ``components`` (its parts) after its siblings."""
    stack: list[tuple[str, Any]] = [("components", raw)]
    seen = 0
    while stack:
        where, items = stack.pop()
        nested: list[tuple[str, Any]] = []
        for i, item in enumerate(_list(items, where)):
            at = f"{where}[{i}]"
            c = _object(item, at)
            seen += 1
            _count(seen, max_components)
            yield Component(name=_text(c.get("name"), f"{at}.name", MAX_NAME, required=True) or "",
                            version=_text(c.get("version"), f"{at}.version", MAX_VERSION),
                            purl=_text(c.get("purl"), f"{at}.purl", MAX_PURL),
                            type=_text(c.get("type"), f"{at}.type", MAX_TYPE))
            if "components" in c:
                nested.append((f"{at}.components", c["components"]))
        stack.extend(reversed(nested))


def _spdx(raw: Any, max_components: int) -> Iterator[Component]:
    for i, item in enumerate(_list(raw, "packages")):
        at = f"packages[{i}]"
        p = _object(item, at)
        _count(i + 1, max_components)
        purl = None
        for j, ref in enumerate(_list(p.get("externalRefs", []), f"{at}.externalRefs")):
            r = _object(ref, f"{at}.externalRefs[{j}]")
            if r.get("referenceType") == "purl":
                purl = _text(r.get("referenceLocator"), f"{at}.externalRefs[{j}].referenceLocator", MAX_PURL,
                             required=True)
                break
        version = p.get("versionInfo")
        yield Component(name=_text(p.get("name"), f"{at}.name", MAX_NAME, required=True) or "",
                        version=None if version == "NOASSERTION" else _text(version, f"{at}.versionInfo",
                                                                            MAX_VERSION),
                        purl=purl,
                        type=_text(p.get("primaryPackagePurpose"), f"{at}.primaryPackagePurpose", MAX_TYPE))
