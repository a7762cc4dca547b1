"""The gRPC edge: the only server code that imports grpc or the generated hub.api modules.

Servicers here turn requests into domain values (`wire`), call the core (`hub.commands`,
`hub.fanout`, `hub.store`), and turn results back; domain errors become statuses in one place
(`errors`).
"""
