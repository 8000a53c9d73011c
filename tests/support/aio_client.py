"""An asyncio channel with the client's security options (only the tests use one).

The client itself is synchronous; this twin of client.security.open_channel lets the tests
check that a token travels on asyncio channels too, as async callers of the protocol send it.
"""

from __future__ import annotations

import grpc

from client.security import PLAINTEXT, ClientSecurity, warn_token_in_plaintext


def open_aio_channel(target: str, security: ClientSecurity = PLAINTEXT, options=()) -> grpc.aio.Channel:
    """The asyncio twin of `open_channel`."""
    options = list(options) + security.channel_options()
    interceptors = [_AioTokenInterceptor(security.metadata())] if security.token else None
    if security.uses_tls:
        return grpc.aio.secure_channel(target, security.channel_credentials(), options=options,
                                       interceptors=interceptors)  # fmt: skip
    warn_token_in_plaintext(security)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


class _AioTokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds the authorization metadata to every call of an asyncio channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(tuple(details.metadata or ()) + self._metadata))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)
