// Stand-in for kubernetes-csi/external-resizer, which the Go module proxy does
// not serve. It does the resizer's part of the expansion protocol and nothing
// more: for every bound PVC of this driver whose request exceeds its PV, it
// records the allocation on the PVC, calls ControllerExpandVolume, raises the
// PV's capacity, and either marks the PVC NodeResizePending (the kubelet then
// calls NodeExpandVolume and finishes the PVC's status) or finishes it itself.
// It polls instead of watching and assumes one replica; the leader-election
// flags deploy/ passes are accepted and ignored.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "CSI socket")
	timeout := flag.Duration("timeout", 60*time.Second, "timeout of one CSI call")
	flag.Bool("leader-election", false, "ignored (one replica)")
	flag.String("leader-election-namespace", "", "ignored")
	flag.Bool("handle-volume-inuse-error", false, "ignored")
	flag.Parse()

	cfg, err := rest.InClusterConfig()
	if err != nil {
		log.Fatalf("in-cluster config: %v", err)
	}
	kc := kubernetes.NewForConfigOrDie(cfg)
	conn, err := grpc.NewClient("unix://"+*csiAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("csi connection: %v", err)
	}
	var driver string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		info, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			driver = info.GetName()
			break
		}
		log.Printf("waiting for the driver: %v", err)
		time.Sleep(2 * time.Second)
	}
	ctrl := csi.NewControllerClient(conn)
	log.Printf("resizing the PVCs of %s", driver)
	for {
		if err := pass(kc, ctrl, driver, *timeout); err != nil {
			log.Printf("pass: %v", err)
		}
		time.Sleep(2 * time.Second)
	}
}

func pass(kc *kubernetes.Clientset, ctrl csi.ControllerClient, driver string, timeout time.Duration) error {
	ctx := context.Background()
	pvcs, err := kc.CoreV1().PersistentVolumeClaims("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for i := range pvcs.Items {
		pvc := &pvcs.Items[i]
		if pvc.Status.Phase != v1.ClaimBound || pvc.Spec.VolumeName == "" {
			continue
		}
		want := pvc.Spec.Resources.Requests[v1.ResourceStorage]
		pv, err := kc.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
		if err != nil || pv.Spec.CSI == nil || pv.Spec.CSI.Driver != driver {
			continue
		}
		have := pv.Spec.Capacity[v1.ResourceStorage]
		if want.Cmp(have) <= 0 {
			continue
		}
		if err := resize(ctx, kc, ctrl, pvc, pv, want, timeout); err != nil {
			log.Printf("%s/%s: %v", pvc.Namespace, pvc.Name, err)
		}
	}
	return nil
}

func patchStatus(ctx context.Context, kc *kubernetes.Clientset, pvc *v1.PersistentVolumeClaim, status map[string]any) error {
	body, _ := json.Marshal(map[string]any{"status": status})
	_, err := kc.CoreV1().PersistentVolumeClaims(pvc.Namespace).Patch(ctx, pvc.Name, types.MergePatchType, body, metav1.PatchOptions{}, "status")
	return err
}

func condition(t v1.PersistentVolumeClaimConditionType, msg string) []map[string]any {
	return []map[string]any{{
		"type": string(t), "status": "True", "message": msg,
		"lastTransitionTime": time.Now().UTC().Format(time.RFC3339),
	}}
}

func resize(ctx context.Context, kc *kubernetes.Clientset, ctrl csi.ControllerClient, pvc *v1.PersistentVolumeClaim, pv *v1.PersistentVolume, want resource.Quantity, timeout time.Duration) error {
	log.Printf("%s/%s: expanding %s to %s", pvc.Namespace, pvc.Name, pv.Spec.CSI.VolumeHandle, want.String())
	if err := patchStatus(ctx, kc, pvc, map[string]any{
		"allocatedResources":        map[string]string{"storage": want.String()},
		"allocatedResourceStatuses": map[string]string{"storage": string(v1.PersistentVolumeClaimControllerResizeInProgress)},
		"conditions":                condition(v1.PersistentVolumeClaimResizing, "controller expansion in progress"),
	}); err != nil {
		return fmt.Errorf("mark in progress: %w", err)
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp, err := ctrl.ControllerExpandVolume(cctx, &csi.ControllerExpandVolumeRequest{
		VolumeId:         pv.Spec.CSI.VolumeHandle,
		CapacityRange:    &csi.CapacityRange{RequiredBytes: want.Value()},
		VolumeCapability: capability(pv),
	})
	if err != nil {
		patchStatus(ctx, kc, pvc, map[string]any{
			"allocatedResourceStatuses": map[string]string{"storage": string(v1.PersistentVolumeClaimControllerResizeInfeasible)},
			"conditions":                condition(v1.PersistentVolumeClaimControllerResizeError, err.Error()),
		})
		return fmt.Errorf("ControllerExpandVolume: %w", err)
	}
	got := resource.NewQuantity(resp.GetCapacityBytes(), resource.BinarySI)
	if got.Cmp(want) < 0 {
		got = &want
	}
	body, _ := json.Marshal(map[string]any{"spec": map[string]any{"capacity": map[string]string{"storage": got.String()}}})
	if _, err := kc.CoreV1().PersistentVolumes().Patch(ctx, pv.Name, types.MergePatchType, body, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("patch PV capacity: %w", err)
	}
	if resp.GetNodeExpansionRequired() {
		log.Printf("%s/%s: controller expansion done (%s); node expansion pending", pvc.Namespace, pvc.Name, got.String())
		return patchStatus(ctx, kc, pvc, map[string]any{
			"allocatedResourceStatuses": map[string]string{"storage": string(v1.PersistentVolumeClaimNodeResizePending)},
			"conditions":                condition(v1.PersistentVolumeClaimFileSystemResizePending, "waiting for the kubelet to expand the volume on the node"),
		})
	}
	log.Printf("%s/%s: expanded to %s", pvc.Namespace, pvc.Name, got.String())
	return patchStatus(ctx, kc, pvc, map[string]any{
		"capacity":                  map[string]string{"storage": got.String()},
		"allocatedResourceStatuses": nil,
		"conditions":                nil,
	})
}

func capability(pv *v1.PersistentVolume) *csi.VolumeCapability {
	mode := csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	for _, m := range pv.Spec.AccessModes {
		switch m {
		case v1.ReadWriteOncePod:
			mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
		case v1.ReadOnlyMany:
			mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
		}
	}
	c := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode}}
	if pv.Spec.VolumeMode != nil && *pv.Spec.VolumeMode == v1.PersistentVolumeBlock {
		c.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		c.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: pv.Spec.CSI.FSType}}
	}
	return c
}
