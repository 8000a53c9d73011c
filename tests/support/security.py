"""Shared by test_security.py and test_security_server.py: tokens, the test PKI, RPC codes."""

from __future__ import annotations

import grpc
import pytest

from tests.support.tls_certificates import make_test_pki

TOKEN = "s3cret-token-0123456789abcdef"
OTHER_TOKEN = "another-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def rpc_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()
