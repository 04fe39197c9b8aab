"""`triptych admin ...` subcommands: operator calls over the SDK (gRPC only, no torch or Ray)."""
