// A pod's Go program, built against the Go SDK v2 as Debian packages it (aws 1.17,
// credentials 1.12): the default credential chain, as an application would load it,
// then one AWS call with what it got. Prints one JSON line; exits 1 without credentials.
//
// Build: GO111MODULE=off GOPATH=/usr/share/gocode go build -o pod-go main.go
// Usage: pod-go STS_ENDPOINT_URL
package main

import (
	"context"
	"encoding/json"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/sts"
)

type result struct {
	AccessKeyID string  `json:"access_key_id,omitempty"`
	Arn         string  `json:"arn,omitempty"`
	Seconds     float64 `json:"seconds"`
	Error       string  `json:"error,omitempty"`
}

func main() {
	ctx := context.Background()
	out := json.NewEncoder(os.Stdout)
	started := time.Now()
	fail := func(err error) {
		out.Encode(result{Seconds: time.Since(started).Seconds(), Error: err.Error()})
		os.Exit(1)
	}
	stsURL := os.Args[1]
	resolver := aws.EndpointResolverWithOptionsFunc(func(service, region string, options ...interface{}) (aws.Endpoint, error) {
		return aws.Endpoint{URL: stsURL, SigningRegion: region}, nil
	})
	cfg, err := config.LoadDefaultConfig(ctx, config.WithRegion("us-east-1"), config.WithEndpointResolverWithOptions(resolver))
	if err != nil {
		fail(err)
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		fail(err)
	}
	got := result{AccessKeyID: creds.AccessKeyID, Seconds: time.Since(started).Seconds()}
	identity, err := sts.NewFromConfig(cfg).GetCallerIdentity(ctx, &sts.GetCallerIdentityInput{})
	if err != nil {
		fail(err)
	}
	got.Arn = aws.ToString(identity.Arn)
	out.Encode(got)
}
