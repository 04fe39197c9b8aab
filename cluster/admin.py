"""The admin service, `triptych.v1.TriptychAdmin`, on its own port.

Operator calls (moving workers between pools, cluster status) are never served on the serving
port: they listen on server.admin_host:admin_port, loopback by default. Binding it elsewhere needs
an admin key (the config refuses otherwise), and with admin keys configured every call needs
`authorization: Bearer <admin key>`; serving keys are not admin keys. TLS is the serving ports'.
"""

from __future__ import annotations

import logging

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.auth import KeyRing
from cluster.config import ServerConfig
from cluster.gateway import bind_grpc, grpc_options
from cluster.gateway_proto import GRPC_CODES, switch_to_pb
from cluster.gateway_service import UNAUTHENTICATED_MESSAGE, Gateway, answer_status, bearer
from cluster.router_api import ErrorKind, Router, RouterError
from engine.worker_api import Role
from protos.triptych.v1 import triptych_pb2 as pb
from protos.triptych.v1 import triptych_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TriptychAdmin"].full_name
_ROLE_FROM_PB = {
    pb.ROLE_PREFILL: Role.PREFILL,
    pb.ROLE_DECODE: Role.DECODE,
    pb.ROLE_ENCODE: Role.ENCODE,
    pb.ROLE_COLOCATED: Role.COLOCATED,
}


class AdminService(pb_grpc.TriptychAdminServicer):
    def __init__(self, router: Router, gateway: Gateway, keys: KeyRing) -> None:
        self.router = router
        self.gateway = gateway  # refusals are counted in its metrics
        self.keys = keys

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        who = self.keys.admin(bearer(context))
        if who is None:
            self.gateway.refuse(
                RouterError(ErrorKind.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, "unauthenticated"), "admin"
            )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown admin key (send 'authorization: Bearer <admin key>')",
            )
        log.info("admin call %s by %s", context.peer(), who)

    async def SetWorkerRole(self, request: pb.SetWorkerRoleRequest, context) -> pb.SetWorkerRoleResponse:
        await self._authorize(context)
        role = _ROLE_FROM_PB.get(request.role)
        if role is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "role must be ROLE_ENCODE, ROLE_PREFILL or ROLE_DECODE"
            )
        if not request.worker_id or len(request.worker_id) > 128:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "worker_id must be 1 to 128 characters")
        if not 0 <= request.drain_timeout_s <= 3600:  # NaN fails both comparisons
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "drain_timeout_s must be in [0, 3600]")
        try:
            record = await self.router.set_worker_role(
                request.worker_id, role, request.reason[:200] or "manual", request.drain_timeout_s or 60.0
            )
        except RouterError as err:
            await context.abort(GRPC_CODES[err.kind], err.message)
        finally:
            self.gateway.forget_status()  # even a refused switch may have drained or killed a worker
        return pb.SetWorkerRoleResponse(switch=switch_to_pb(record))

    async def GetClusterStatus(self, request, context) -> pb.GetClusterStatusResponse:
        await self._authorize(context)
        return await answer_status(self.gateway, context)


async def serve(
    router: Router,
    gateway: Gateway,
    keys: KeyRing,
    server: ServerConfig,
    creds: grpc.ServerCredentials | None,
    health_servicer: health.aio.HealthServicer,
) -> tuple[grpc.aio.Server, int]:
    """Start the admin gRPC server; (server, bound port)."""
    admin = grpc.aio.server(options=grpc_options(server, supports_images=False))  # admin calls are small
    pb_grpc.add_TriptychAdminServicer_to_server(AdminService(router, gateway, keys), admin)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, admin)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((ADMIN_SERVICE_NAME, health_name, reflection.SERVICE_NAME), admin)
    port = bind_grpc(admin, f"{server.admin_host}:{server.admin_port}", creds)
    await admin.start()
    return admin, port
