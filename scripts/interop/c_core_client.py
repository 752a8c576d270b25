"""Calls a live Loam through grpc C-core (Python grpcio) and checks each answer.

Usage: c_core_client.py unix:///path/to/csi.sock  (the CSI stubs on PYTHONPATH)
Prints one line per check and `interop: N passed, N failed`; exits 1 on any failure.
"""

import sys

import grpc

import csi_pb2
import csi_pb2_grpc

MIB = 1 << 20


def checks(channel):
    """Yields (name, function) pairs; each function raises on a wrong answer."""
    identity = csi_pb2_grpc.IdentityStub(channel)
    controller = csi_pb2_grpc.ControllerStub(channel)
    node = csi_pb2_grpc.NodeStub(channel)
    capability = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )
    created = {}

    def plugin_info():
        info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=30)
        assert info.name == "loam.csi.dev", info

    def probe():
        probe = identity.Probe(csi_pb2.ProbeRequest(), timeout=30)
        assert probe.ready.value, probe

    def node_info():
        info = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=30)
        assert info.node_id == "interop-node", info

    def create_volume():
        request = csi_pb2.CreateVolumeRequest(
            name="pvc-interop",
            capacity_range=csi_pb2.CapacityRange(required_bytes=MIB),
            volume_capabilities=[capability],
        )
        volume = controller.CreateVolume(request, timeout=30).volume
        assert volume.capacity_bytes >= MIB, volume
        created["id"] = volume.volume_id

    def list_volumes():
        listed = controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30)
        ids = [entry.volume.volume_id for entry in listed.entries]
        assert ids == [created["id"]], ids

    def bad_input_is_invalid_argument():
        try:
            controller.CreateVolume(csi_pb2.CreateVolumeRequest(name=""), timeout=30)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
            return
        raise AssertionError("CreateVolume without a name succeeded")

    def delete_volume():
        controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=created["id"]), timeout=30)
        listed = controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30)
        assert not listed.entries, listed

    yield from [
        ("Identity.GetPluginInfo", plugin_info),
        ("Identity.Probe", probe),
        ("Node.NodeGetInfo", node_info),
        ("Controller.CreateVolume", create_volume),
        ("Controller.ListVolumes", list_volumes),
        ("Controller.CreateVolume without a name: INVALID_ARGUMENT", bad_input_is_invalid_argument),
        ("Controller.DeleteVolume", delete_volume),
    ]


def main():
    target = sys.argv[1]
    print(f"grpcio {grpc.__version__} (C-core) -> {target}")
    passed = failed = 0
    with grpc.insecure_channel(target) as channel:
        for name, check in checks(channel):
            try:
                check()
            except Exception as error:  # every failure is reported, then counted
                failed += 1
                print(f"FAIL {name}: {error}")
            else:
                passed += 1
                print(f"ok   {name}")
    print(f"interop: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
