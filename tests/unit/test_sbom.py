"""SBOM parsing: CycloneDX and SPDX JSON reduced to components; bad documents named precisely."""

from __future__ import annotations

import json

import pytest

from corral.errors import InvalidInput
from corral.server.updates.sbom import Component, parse


def doc(d: object) -> bytes:
    return json.dumps(d).encode()


def test_cyclonedx_components_and_their_parts() -> None:
    sbom = parse(doc({"bomFormat": "CycloneDX", "specVersion": "1.5", "components": [
        {"type": "library", "name": "openssl", "version": "3.0.13", "purl": "pkg:deb/debian/openssl@3.0.13",
         "components": [{"name": "libcrypto", "version": "3.0.13"}]},
        {"type": "application", "name": "busybox"},
    ]}), max_components=10)
    assert sbom.format == "CycloneDX 1.5"
    assert sbom.components == [
        Component("openssl", "3.0.13", "pkg:deb/debian/openssl@3.0.13", "library"),
        Component("busybox", None, None, "application"),
        Component("libcrypto", "3.0.13", None, None),
    ]


def test_cyclonedx_without_components_is_an_empty_list() -> None:
    assert parse(doc({"bomFormat": "CycloneDX", "specVersion": "1.6"}), 10).components == []


def test_spdx_packages_with_purl_refs() -> None:
    sbom = parse(doc({"spdxVersion": "SPDX-2.3", "packages": [
        {"name": "zlib", "versionInfo": "1.3", "primaryPackagePurpose": "LIBRARY", "externalRefs": [
            {"referenceCategory": "SECURITY", "referenceType": "cpe23Type", "referenceLocator": "cpe:2.3:a:zlib"},
            {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
             "referenceLocator": "pkg:generic/zlib@1.3"}]},
        {"name": "mystery", "versionInfo": "NOASSERTION"},
    ]}), 10)
    assert sbom.format == "SPDX-2.3"
    assert sbom.components == [Component("zlib", "1.3", "pkg:generic/zlib@1.3", "LIBRARY"),
                               Component("mystery", None, None, None)]


@pytest.mark.parametrize(("data", "message"), [
    (b"{not json", "SBOM is not valid JSON"),
    (b"[]", "SBOM must be a JSON object"),
    (doc({"hello": 1}), "SBOM format not recognised"),
    (doc({"bomFormat": "CycloneDX", "components": {"name": "x"}}), "SBOM components must be a list"),
    (doc({"bomFormat": "CycloneDX", "components": [{"name": "a"}, {"version": "1"}]}),
     "SBOM components[1].name is missing"),
    (doc({"bomFormat": "CycloneDX", "components": [{"name": "a", "components": [{"name": 5}]}]}),
     "SBOM components[0].components[0].name must be a string"),
    (doc({"spdxVersion": "SPDX-2.3", "packages": [{"name": "a", "externalRefs": [
        {"referenceType": "purl"}]}]}), "SBOM packages[0].externalRefs[0].referenceLocator is missing"),
    (doc({"bomFormat": "CycloneDX", "components": [{"name": "x" * 300}]}),
     "SBOM components[0].name is longer than 256 characters"),
    (doc({"bomFormat": "CycloneDX", "components": [{"name": "a"}] * 3}), "SBOM has more than 2 components"),
])
def test_bad_documents_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse(data, max_components=2)
    assert e.value.detail.startswith(message), e.value.detail
