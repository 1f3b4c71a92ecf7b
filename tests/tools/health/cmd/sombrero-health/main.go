// sombrero-health evaluates a Kubernetes object's health the way the GitOps
// tools do, so tests can check the health rules shipped in examples/gitops/:
//
//	sombrero-health argocd <script.lua> <object.json|yaml>
//	    runs an Argo CD resource health script (Lua 5.1 via gopher-lua, the
//	    interpreter Argo CD embeds) with the global `obj` set to the object,
//	    and prints the returned table, e.g. {"status":"Healthy","message":"…"}
//	sombrero-health kstatus <object.json|yaml>
//	    runs kstatus status.Compute (sigs.k8s.io/cli-utils, what Flux's
//	    health checks use for custom resources) and prints
//	    {"status":"Current","message":"…"}
//
// Exit 0 with the JSON on stdout; exit 1 with the reason on stderr.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

type result struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "sombrero-health:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	var (
		res *result
		err error
	)
	switch {
	case len(args) == 3 && args[0] == "argocd":
		res, err = argocd(args[1], args[2])
	case len(args) == 2 && args[0] == "kstatus":
		res, err = kstatus(args[1])
	default:
		return fmt.Errorf("usage: sombrero-health argocd <script.lua> <object> | kstatus <object>")
	}
	if err != nil {
		return err
	}
	out, err := json.Marshal(res)
	if err != nil {
		return err
	}
	fmt.Println(string(out))
	return nil
}

// readObject reads a JSON or YAML file into an unstructured object, with
// numbers as int64/float64 like the API machinery's JSON decoding gives.
func readObject(path string) (*unstructured.Unstructured, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	j, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(j); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return u, nil
}

func kstatus(objPath string) (*result, error) {
	u, err := readObject(objPath)
	if err != nil {
		return nil, err
	}
	r, err := status.Compute(u)
	if err != nil {
		return nil, fmt.Errorf("kstatus: %w", err)
	}
	return &result{Status: r.Status.String(), Message: r.Message}, nil
}

// argocd mirrors Argo CD's util/lua VM: only the package, base and table
// libraries are opened (no string/os/io: a script that uses them fails
// here as it would in Argo CD), `obj` is the decoded object, a 1 s timeout,
// and the returned table must carry a known health status.
func argocd(scriptPath, objPath string) (*result, error) {
	script, err := os.ReadFile(scriptPath)
	if err != nil {
		return nil, err
	}
	u, err := readObject(objPath)
	if err != nil {
		return nil, err
	}
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	obj, err := decode(l, u.Object)
	if err != nil {
		return nil, err
	}
	l.SetGlobal("obj", obj)
	if err := l.DoString(string(script)); err != nil {
		return nil, fmt.Errorf("lua: %w", err)
	}
	ret, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return nil, fmt.Errorf("the script returned %s, not a table", l.Get(-1).Type())
	}
	res := &result{}
	if s, ok := ret.RawGetString("status").(lua.LString); ok {
		res.Status = string(s)
	}
	if m, ok := ret.RawGetString("message").(lua.LString); ok {
		res.Message = string(m)
	}
	switch res.Status {
	case "Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown":
	default:
		return nil, fmt.Errorf("the script returned an unknown health status %q", res.Status)
	}
	return res, nil
}

func decode(l *lua.LState, v any) (lua.LValue, error) {
	switch c := v.(type) {
	case nil:
		return lua.LNil, nil
	case bool:
		return lua.LBool(c), nil
	case string:
		return lua.LString(c), nil
	case int64:
		return lua.LNumber(c), nil
	case float64:
		return lua.LNumber(c), nil
	case []any:
		t := l.CreateTable(len(c), 0)
		for _, item := range c {
			lv, err := decode(l, item)
			if err != nil {
				return nil, err
			}
			t.Append(lv)
		}
		return t, nil
	case map[string]any:
		t := l.CreateTable(0, len(c))
		for k, item := range c {
			lv, err := decode(l, item)
			if err != nil {
				return nil, err
			}
			t.RawSetString(k, lv)
		}
		return t, nil
	default:
		return nil, fmt.Errorf("unsupported JSON value of type %T", v)
	}
}
