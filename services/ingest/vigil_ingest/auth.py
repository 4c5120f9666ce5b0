"""Bearer-token authentication for the device API (a grpc.aio server interceptor).

Devices (or vendor gateways) send `authorization: Bearer <token>` metadata with a Keycloak
client-credentials access token for audience `vigil-ingest`. Every method of IngestService and
DeviceService needs a valid token; writing readings, registering and binding need the scope
`device/readings.write`. The vendor is the token's `azp` (the OAuth client id): a vendor sees and
writes only devices it registered. grpc.health.v1 and server reflection stay unauthenticated.

The interceptor validates the token inside the wrapped handler (so the async JWKS fetch runs on the
RPC's task) and hands the Principal to the servicer through a context variable.
"""
from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from vigil.tokens import KeyFetchError, TokenError, TokenValidator

log = logging.getLogger("vigil.ingest.auth")

WRITE_SCOPE = "device/readings.write"
ERROR_DOMAIN = "vigil.dev"
PROTECTED_PREFIXES = ("/vigil.device.v1.",)


@dataclass(frozen=True)
class Principal:
    vendor: str
    scopes: frozenset[str]
    subject: str = ""


PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("vigil_principal", default=None)


def current_vendor() -> str | None:
    """The caller's vendor id, or None when auth is off (no ownership checks)."""
    p = PRINCIPAL.get()
    return None if p is None else p.vendor


def error_status(code: int, message: str, reason: str, **metadata: str) -> grpc.Status:
    st = status_pb2.Status(code=code, message=message)
    st.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    return rpc_status.to_status(st)


def require_scope(scope: str = WRITE_SCOPE) -> grpc.Status | None:
    """None when allowed, else a PERMISSION_DENIED status to abort with."""
    p = PRINCIPAL.get()
    if p is None or scope in p.scopes:
        return None
    return error_status(code_pb2.PERMISSION_DENIED, f"the token lacks the scope {scope!r}",
                        "INSUFFICIENT_SCOPE", scope=scope)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, validator: TokenValidator):
        self.validator = validator

    async def _authenticate(self, context) -> Principal | None:
        """Principal, or None after aborting the RPC."""
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                if isinstance(value, bytes):
                    value = value.decode("latin-1")
                scheme, _, rest = value.partition(" ")
                if scheme.lower() == "bearer" and rest.strip():
                    token = rest.strip()
                break
        if token is None:
            await context.abort_with_status(error_status(
                code_pb2.UNAUTHENTICATED, "missing `authorization: Bearer <token>` metadata", "TOKEN_MISSING"))
        try:
            claims = await self.validator.avalidate(token)
        except KeyFetchError as e:
            await context.abort_with_status(error_status(
                code_pb2.UNAVAILABLE, f"cannot check the token now: {e.reason if hasattr(e, 'reason') else e}",
                "ISSUER_UNAVAILABLE"))
        except TokenError as e:
            await context.abort_with_status(error_status(
                code_pb2.UNAUTHENTICATED, f"invalid token: {getattr(e, 'reason', e)}", "TOKEN_INVALID"))
        vendor = claims.get("azp") or claims.get("client_id") or ""
        if not vendor:
            await context.abort_with_status(error_status(
                code_pb2.UNAUTHENTICATED, "the token names no client (azp)", "TOKEN_INVALID"))
        scopes = frozenset(str(claims.get("scope", "")).split())
        return Principal(vendor=vendor, scopes=scopes, subject=str(claims.get("sub", "")))

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PROTECTED_PREFIXES):
            return handler
        authenticate = self._authenticate

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                PRINCIPAL.set(await authenticate(context))
                return await inner(request, context)
            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(request_iterator, context):
                PRINCIPAL.set(await authenticate(context))
                async for resp in inner_ss(request_iterator, context):
                    yield resp
            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        raise RuntimeError(f"unsupported handler kind for {handler_call_details.method}")
