// Command chart-token checks that charts/loam keeps the agent token across
// `helm upgrade`: it renders the chart through Helm's own engine with a fake
// API server behind `lookup`, as `helm install` (no Secret yet) and as
// `helm upgrade` (the installed Secret there), and fails unless the install
// makes a fresh, long enough token each time and the upgrade keeps the
// installed one. A changed token would make the controller and the node
// agents refuse each other until both restarted.
//
//	go run ./scripts/chart-token charts/loam
package main

import (
	"encoding/base64"
	"fmt"
	"os"

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

var secrets = schema.GroupVersionResource{Version: "v1", Resource: "secrets"}

// cluster answers `lookup` from the objects it holds; any kind but Secret is an error, since the chart looks up
// nothing else.
type cluster struct{ client *fake.FakeDynamicClient }

func (c cluster) GetClientFor(apiVersion, kind string) (dynamic.NamespaceableResourceInterface, bool, error) {
	if apiVersion != "v1" || kind != "Secret" {
		return nil, false, fmt.Errorf("the chart looked up %s %s: only v1 Secret is expected", apiVersion, kind)
	}
	return c.client.Resource(secrets), true, nil
}

func newCluster(objects ...runtime.Object) cluster {
	return cluster{fake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{secrets: "SecretList"}, objects...)}
}

// tokenSecret renders the chart against the cluster and returns the agent token Secret it makes (nil when none).
func tokenSecret(chrt *chart.Chart, c cluster, upgrade bool, values map[string]any) (map[string]any, error) {
	options := common.ReleaseOptions{Name: "loam", Namespace: namespace, Revision: 1, IsInstall: !upgrade, IsUpgrade: upgrade}
	top, err := util.ToRenderValuesWithSchemaValidation(chrt, values, options, common.DefaultCapabilities, false)
	if err != nil {
		return nil, err
	}
	out, err := engine.RenderWithClientProvider(chrt, top, c)
	if err != nil {
		return nil, err
	}
	var secret map[string]any
	if err := yaml.Unmarshal([]byte(out["loam/templates/agent-token.yaml"]), &secret); err != nil {
		return nil, err
	}
	return secret, nil
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
	return nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: chart-token CHART_DIR")
		os.Exit(2)
	}
	if err := check(os.Args[1]); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL agent token: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("agent token: each install makes a new one (48 characters), an upgrade keeps the installed one," +
		" existingSecret makes none")
}
