// Command rulecheck checks Prometheus rule files the way `promtool check
// rules` does (rulefmt.ParseFile: YAML structure, PromQL of every expression,
// label and annotation templates), and also that every metric an expression
// names is one Loam exports: a rename of a metric fails here, not in an
// operator's silent alert.
//
//	go run . -metrics NAMES_FILE RULE_FILE...
//
// NAMES_FILE holds one exported metric family per line (histograms as their
// family name; `_bucket`, `_count` and `_sum` are accepted after it).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

func main() {
	namesFile := flag.String("metrics", "", "file of exported metric names, one per line")
	flag.Parse()
	known, err := readNames(*namesFile)
	if err != nil {
		fail("%v", err)
	}
	promql := parser.NewParser(parser.Options{})
	rules := 0
	for _, path := range flag.Args() {
		groups, errs := rulefmt.ParseFile(path, false, model.UTF8Validation, promql, slog.New(slog.DiscardHandler))
		for _, e := range errs {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, e)
		}
		if len(errs) > 0 {
			os.Exit(1)
		}
		for _, group := range groups.Groups {
			for _, rule := range group.Rules {
				rules++
				name := rule.Alert
				if name == "" {
					name = rule.Record
				}
				expr, err := promql.ParseExpr(rule.Expr)
				if err != nil {
					fail("%s: %s: %v", path, name, err)
				}
				parser.Inspect(expr, func(node parser.Node, _ []parser.Node) error {
					if selector, ok := node.(*parser.VectorSelector); ok && !exported(selector.Name, known) {
						fail("%s: %s names %q, which Loam does not export", path, name, selector.Name)
					}
					return nil
				})
			}
		}
	}
	if rules == 0 {
		fail("no rules in %v", flag.Args())
	}
	fmt.Printf("rules: %d rules in %d files parse and name only exported metrics\n", rules, len(flag.Args()))
}

func readNames(path string) (map[string]bool, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	names := map[string]bool{}
	scanner := bufio.NewScanner(file)
	for scanner.Scan() {
		if name := strings.TrimSpace(scanner.Text()); name != "" {
			names[name] = true
		}
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("%s names no metric", path)
	}
	return names, scanner.Err()
}

func exported(name string, known map[string]bool) bool {
	if known[name] {
		return true
	}
	for _, suffix := range []string{"_bucket", "_count", "_sum"} {
		if strings.HasSuffix(name, suffix) && known[strings.TrimSuffix(name, suffix)] {
			return true
		}
	}
	return false
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "rulecheck: "+format+"\n", args...)
	os.Exit(1)
}
