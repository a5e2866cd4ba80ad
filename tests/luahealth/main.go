// luahealth runs Argo CD resource health scripts the way Argo CD's application controller does,
// for fmforge's tests (tests/argocd.py builds it with build.sh and calls it).
//
// Argo CD evaluates a health.lua in gopher-lua (Lua 5.1) with the live object as the global
// `obj` and reads the table the chunk returns as {status, message}. This program reproduces
// that contract, with the gopher-lua and gopher-json versions Argo CD's go.mod pins (build.sh
// reads them from the Argo CD release under test):
//   - a fresh state per evaluation; without -openlibs (a script from argocd-cm, where
//     `resource.customizations.useOpenLibs.<group_kind>` is unset) only the package, base and
//     table libraries are opened, as in Argo CD; Argo CD also opens a restricted `os` library
//     of its own, which fmforge's scripts do not use and this program leaves out. With
//     -openlibs every standard library is open, as for Argo CD's built-in scripts and tests;
//   - JSON numbers become Lua numbers, objects and arrays tables, null nil;
//   - a one-second limit per evaluation (Argo CD's context timeout);
//   - the returned table is encoded with gopher-json and decoded as a health status; a status
//     outside Argo CD's six codes becomes Unknown with Argo CD's message; nil is an empty
//     health; anything else, and any runtime error, is an error (Argo CD then shows the
//     error instead of a health).
//
// Input on stdin: a JSON array of {"script": "...", "object": {...}}. Output on stdout: a JSON
// array, one {"status": "...", "message": "..."} or {"error": "..."} per input, in order.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	luajson "layeh.com/gopher-json"
)

type evaluation struct {
	Script string `json:"script"`
	Object any    `json:"object"`
}

type result struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

// The health codes Argo CD accepts from a script (gitops-engine's health.HealthStatusCode).
var validCodes = map[string]bool{
	"Unknown": true, "Progressing": true, "Suspended": true, "Healthy": true, "Degraded": true, "Missing": true,
}

func toLua(l *lua.LState, v any) lua.LValue {
	switch x := v.(type) {
	case bool:
		return lua.LBool(x)
	case float64:
		return lua.LNumber(x)
	case string:
		return lua.LString(x)
	case []any:
		t := l.CreateTable(len(x), 0)
		for _, item := range x {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]any:
		t := l.CreateTable(0, len(x))
		for k, item := range x {
			t.RawSetH(lua.LString(k), toLua(l, item))
		}
		return t
	}
	return lua.LNil
}

func evaluate(e evaluation, openLibs bool) (res result) {
	l := lua.NewState(lua.Options{SkipOpenLibs: !openLibs})
	defer l.Close()
	if !openLibs {
		for _, lib := range []struct {
			name string
			open lua.LGFunction
		}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
			l.Push(l.NewFunction(lib.open))
			l.Push(lua.LString(lib.name))
			l.Call(1, 0)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, e.Object))
	if err := l.DoString(e.Script); err != nil {
		// Argo CD drops the Lua stack trace of a runtime error: the message reaches users.
		var apiErr *lua.ApiError
		if errors.As(err, &apiErr) && apiErr.Type == lua.ApiErrorRun {
			apiErr.StackTrace = ""
		}
		return result{Error: err.Error()}
	}
	ret := l.Get(-1)
	switch ret.Type() {
	case lua.LTNil:
		return result{}
	case lua.LTTable:
	default:
		return result{Error: fmt.Sprintf("expect table output from Lua script, not %s", ret.Type())}
	}
	encoded, err := luajson.Encode(ret)
	if err != nil {
		return result{Error: err.Error()}
	}
	var hs struct {
		Status  string `json:"status"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal(encoded, &hs); err != nil {
		// An empty table encodes as [], which Argo CD reads as an empty health.
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Value == "array" {
			return result{}
		}
		return result{Error: err.Error()}
	}
	if !validCodes[hs.Status] {
		return result{Status: "Unknown", Message: "Lua returned an invalid health status"}
	}
	return result{Status: hs.Status, Message: hs.Message}
}

func main() {
	openLibs := flag.Bool("openlibs", false, "open every Lua standard library (Argo CD's built-in scripts and tests)")
	flag.Parse()
	var in []evaluation
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "luahealth: reading the evaluations:", err)
		os.Exit(2)
	}
	out := make([]result, len(in))
	for i, e := range in {
		out[i] = evaluate(e, *openLibs)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "luahealth:", err)
		os.Exit(2)
	}
}
