#!/usr/bin/env python3
"""A minimal CRI client for the containerd tests: what kubelet does to a pod sandbox, one call a run.

    cri.py --socket SOCK --stubs DIR version
    cri.py --socket SOCK --stubs DIR runp CONFIG_JSON   # prints the sandbox id
    cri.py --socket SOCK --stubs DIR stopp ID
    cri.py --socket SOCK --stubs DIR rmp ID
    cri.py --socket SOCK --stubs DIR inspectp ID        # JSON: status, info (containerd's), pid
    cri.py --socket SOCK --stubs DIR pods               # JSON list of {id, name, namespace, state}

CONFIG_JSON is a runtime.v1.PodSandboxConfig in protobuf's JSON form, e.g.
{"metadata": {"name": "web-1", "namespace": "default", "uid": "u1"},
 "portMappings": [{"protocol": "UDP", "containerPort": 8081, "hostPort": 30081}]}.

The gRPC stubs are generated from api.proto (beside this file) into DIR on first use, so no
generated code lives in the repository. A failed call prints the gRPC status to stderr, exits 1.
"""
import argparse
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join(HERE, "api.proto")
# RunPodSandbox pulls nothing here, but a slow CNI chain or shim start can take a while.
TIMEOUT_S = 120


def stubs(base):
    """Generates api_pb2 and api_pb2_grpc into a directory named after the proto's hash (so an
    edited proto never meets stale stubs), renamed into place whole (so concurrent runs never
    import a half-written module), and puts it on sys.path."""
    with open(PROTO, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    target = os.path.join(base, digest)
    if not os.path.isdir(target):
        from grpc_tools import protoc

        os.makedirs(base, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=base, prefix=".gen-")
        try:
            include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
            code = protoc.main(["protoc", "-I" + HERE, "-I" + include, "--python_out=" + tmp,
                                "--grpc_python_out=" + tmp, PROTO])
            if code != 0:
                sys.exit("protoc failed on %s (exit %d)" % (PROTO, code))
            try:
                os.rename(tmp, target)
            except OSError:
                if not os.path.isdir(target):  # another run won the race, else a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.path.insert(0, target)
    return importlib.import_module("api_pb2"), importlib.import_module("api_pb2_grpc")


def main():
    parser = argparse.ArgumentParser(description="minimal CRI client")
    parser.add_argument("--socket", required=True, help="containerd's grpc socket")
    parser.add_argument("--stubs", required=True, help="scratch dir for the generated stubs")
    parser.add_argument("command", choices=["version", "runp", "stopp", "rmp", "inspectp", "pods"])
    parser.add_argument("arg", nargs="?")
    args = parser.parse_args()

    pb, pb_grpc = stubs(args.stubs)
    import grpc
    from google.protobuf import json_format

    channel = grpc.insecure_channel("unix://" + os.path.abspath(args.socket))
    rt = pb_grpc.RuntimeServiceStub(channel)
    need_arg = {"runp", "stopp", "rmp", "inspectp"}
    if args.command in need_arg and not args.arg:
        parser.error("%s needs an argument" % args.command)
    try:
        if args.command == "version":
            r = rt.Version(pb.VersionRequest(version="v1"), timeout=TIMEOUT_S)
            print(json_format.MessageToJson(r))
        elif args.command == "runp":
            config = json_format.Parse(args.arg, pb.PodSandboxConfig())
            r = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=TIMEOUT_S)
            print(r.pod_sandbox_id)
        elif args.command == "stopp":
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=args.arg), timeout=TIMEOUT_S)
        elif args.command == "rmp":
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=args.arg), timeout=TIMEOUT_S)
        elif args.command == "inspectp":
            r = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=args.arg, verbose=True),
                                    timeout=TIMEOUT_S)
            # containerd puts its own view under info["info"] as JSON; the pause process's pid is there.
            info = json.loads(r.info.get("info", "{}") or "{}")
            out = {
                "status": json_format.MessageToDict(r.status, preserving_proto_field_name=True),
                "info": info,
                "pid": info.get("pid"),
            }
            print(json.dumps(out))
        elif args.command == "pods":
            r = rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=TIMEOUT_S)
            pods = [{"id": p.id, "name": p.metadata.name, "namespace": p.metadata.namespace,
                     "state": pb.PodSandboxState.Name(p.state)} for p in r.items]
            print(json.dumps(pods))
    except grpc.RpcError as e:
        print("%s failed: %s: %s" % (args.command, e.code().name.lower(), e.details()), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
