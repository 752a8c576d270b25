// Command chart-upgrade checks what charts/loam keeps across `helm upgrade`:
// it renders the chart through Helm's own engine with a fake API server
// behind `lookup`, as `helm install` (nothing there yet) and as `helm upgrade`
// (the installed objects there), and fails unless
//
//   - the install makes a fresh, long enough agent token each time and the
//     upgrade keeps the installed one (a changed token would make the
//     controller and the node agents refuse each other until both restarted);
//
//   - an installed StorageClass keeps the parameters, reclaimPolicy and
//     volumeBindingMode it was made with, which the API server refuses to
//     change (and with them the whole upgrade), and the release notes say
//     how to take the chart's; a class not installed yet gets the chart's.
//
//     go run ./scripts/chart-upgrade charts/loam
package main

import (
	"encoding/base64"
	"fmt"
	"os"
	"reflect"
	"strings"

	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	chart "helm.sh/helm/v4/pkg/chart/v2"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/fake"
	"sigs.k8s.io/yaml"
)

const namespace = "loam"

var (
	secrets        = schema.GroupVersionResource{Version: "v1", Resource: "secrets"}
	storageClasses = schema.GroupVersionResource{Group: "storage.k8s.io", Version: "v1", Resource: "storageclasses"}
)

// cluster answers `lookup` from the objects it holds; any kind but Secret and StorageClass is an error, since the
// chart looks up nothing else.
type cluster struct{ client *fake.FakeDynamicClient }

func (c cluster) GetClientFor(apiVersion, kind string) (dynamic.NamespaceableResourceInterface, bool, error) {
	switch {
	case apiVersion == "v1" && kind == "Secret":
		return c.client.Resource(secrets), true, nil
	case apiVersion == "storage.k8s.io/v1" && kind == "StorageClass":
		return c.client.Resource(storageClasses), false, nil
	}
	return nil, false, fmt.Errorf("the chart looked up %s %s: only v1 Secret and StorageClass are expected", apiVersion, kind)
}

func newCluster(objects ...runtime.Object) cluster {
	return cluster{fake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{secrets: "SecretList", storageClasses: "StorageClassList"}, objects...)}
}

// render renders the chart against the cluster: each template's output by its name.
func render(chrt *chart.Chart, c cluster, upgrade bool, values map[string]any) (map[string]string, error) {
	options := common.ReleaseOptions{Name: "loam", Namespace: namespace, Revision: 1, IsInstall: !upgrade, IsUpgrade: upgrade}
	top, err := util.ToRenderValuesWithSchemaValidation(chrt, values, options, common.DefaultCapabilities, false)
	if err != nil {
		return nil, err
	}
	return engine.RenderWithClientProvider(chrt, top, c)
}

// tokenSecret renders the chart against the cluster and returns the agent token Secret it makes (nil when none).
func tokenSecret(chrt *chart.Chart, c cluster, upgrade bool, values map[string]any) (map[string]any, error) {
	out, err := render(chrt, c, upgrade, values)
	if err != nil {
		return nil, err
	}
	var secret map[string]any
	if err := yaml.Unmarshal([]byte(out["loam/templates/agent-token.yaml"]), &secret); err != nil {
		return nil, err
	}
	return secret, nil
}

// classes renders the chart against the cluster: its StorageClasses by name, and its release notes.
func classes(chrt *chart.Chart, c cluster, upgrade bool) (map[string]map[string]any, string, error) {
	out, err := render(chrt, c, upgrade, nil)
	if err != nil {
		return nil, "", err
	}
	byName := map[string]map[string]any{}
	for _, doc := range strings.Split(out["loam/templates/storageclasses.yaml"], "\n---\n") {
		var class map[string]any
		if err := yaml.Unmarshal([]byte(doc), &class); err != nil {
			return nil, "", err
		}
		if class != nil {
			byName[class["metadata"].(map[string]any)["name"].(string)] = class
		}
	}
	return byName, out["loam/templates/NOTES.txt"], nil
}

// checkClasses: an installed class keeps what cannot change, a new one gets the chart's.
func checkClasses(chrt *chart.Chart) error {
	fresh, _, err := classes(chrt, newCluster(), false)
	if err != nil {
		return fmt.Errorf("install: %w", err)
	}
	loop := fresh["loam-loop"]
	if loop == nil || fresh["loam"] == nil {
		return fmt.Errorf("install: no StorageClasses loam and loam-loop: %v", fresh)
	}
	// loam-loop as an earlier chart made it: other parameters, another binding mode.
	oldParameters := map[string]any{"backend": "loop", "fsType": "ext4"}
	installed := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
		"metadata":          map[string]any{"name": "loam-loop"},
		"provisioner":       "loam.csi.dev",
		"parameters":        oldParameters,
		"reclaimPolicy":     "Retain",
		"volumeBindingMode": "Immediate",
	}}
	upgraded, notes, err := classes(chrt, newCluster(installed), true)
	if err != nil {
		return fmt.Errorf("upgrade: %w", err)
	}
	kept := upgraded["loam-loop"]
	if !reflect.DeepEqual(kept["parameters"], oldParameters) || kept["reclaimPolicy"] != "Retain" ||
		kept["volumeBindingMode"] != "Immediate" {
		return fmt.Errorf("upgrade: the installed loam-loop was rendered with other immutable fields: %v", kept)
	}
	if !reflect.DeepEqual(upgraded["loam"], fresh["loam"]) {
		return fmt.Errorf("upgrade: loam, not installed, differs from a fresh install's: %v", upgraded["loam"])
	}
	if !strings.Contains(notes, "StorageClass loam-loop keeps the parameters it was made with") ||
		strings.Contains(notes, "StorageClass loam keeps") {
		return fmt.Errorf("upgrade: the notes do not say (only) that loam-loop kept its parameters:\n%s", notes)
	}
	// The same class installed as the chart makes it: nothing to say.
	same := &unstructured.Unstructured{Object: loop}
	same.SetAPIVersion("storage.k8s.io/v1")
	same.SetKind("StorageClass")
	if _, notes, err = classes(chrt, newCluster(same), true); err != nil {
		return fmt.Errorf("upgrade: %w", err)
	}
	if strings.Contains(notes, "keeps the parameters") {
		return fmt.Errorf("upgrade: the notes report a class whose parameters are the chart's:\n%s", notes)
	}
	return nil
}

// token is the decoded token of a rendered Secret.
func token(secret map[string]any) (string, error) {
	data, _ := secret["data"].(map[string]any)
	encoded, _ := data["token"].(string)
	decoded, err := base64.StdEncoding.DecodeString(encoded)
	if err != nil || len(decoded) < 16 {
		return "", fmt.Errorf("the Secret's token %q is not base64 of at least 16 characters", encoded)
	}
	return string(decoded), nil
}

func check(chartDir string) error {
	chrt, err := loader.Load(chartDir)
	if err != nil {
		return err
	}
	// Install: no Secret yet, so a new token, a different one on each install.
	var made []string
	for range 2 {
		secret, err := tokenSecret(chrt, newCluster(), false, nil)
		if err != nil {
			return fmt.Errorf("install: %w", err)
		}
		t, err := token(secret)
		if err != nil {
			return fmt.Errorf("install: %w", err)
		}
		made = append(made, t)
	}
	if made[0] == made[1] {
		return fmt.Errorf("install: two installs made the same token %q", made[0])
	}
	// Upgrade: the installed Secret's token is kept, whatever else the values change.
	installed := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": "Secret",
		"metadata": map[string]any{"name": "loam-agent-token", "namespace": namespace},
		"data":     map[string]any{"token": base64.StdEncoding.EncodeToString([]byte(made[0]))},
	}}
	secret, err := tokenSecret(chrt, newCluster(installed), true, map[string]any{"logFormat": "text"})
	if err != nil {
		return fmt.Errorf("upgrade: %w", err)
	}
	kept, err := token(secret)
	if err != nil {
		return fmt.Errorf("upgrade: %w", err)
	}
	if kept != made[0] {
		return fmt.Errorf("upgrade: the token changed from %q to %q", made[0], kept)
	}
	// An existing Secret named in the values: the chart makes none.
	secret, err = tokenSecret(chrt, newCluster(), false, map[string]any{"agentToken": map[string]any{"existingSecret": "mine"}})
	if err != nil {
		return fmt.Errorf("existingSecret: %w", err)
	}
	if secret != nil {
		return fmt.Errorf("existingSecret: the chart still made a Secret: %v", secret)
	}
	return checkClasses(chrt)
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: chart-upgrade CHART_DIR")
		os.Exit(2)
	}
	if err := check(os.Args[1]); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL helm upgrade: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("agent token: each install makes a new one (48 characters), an upgrade keeps the installed one," +
		" existingSecret makes none; an installed StorageClass keeps its immutable fields and the notes say so")
}
