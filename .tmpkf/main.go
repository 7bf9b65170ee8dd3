package main

import (
	"fmt"
	"os"
	"os/signal"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"
)

func main() {
	opts := []kfake.Opt{kfake.NumBrokers(3), kfake.DefaultNumPartitions(3), kfake.Ports(39092, 39093, 39094), kfake.AllowAutoTopicCreation()}
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		panic(err)
	}
	if os.Getenv("NO_TELEMETRY") != "" {
		c.ControlKey(71, func(kreq kmsg.Request) (kmsg.Response, error, bool) {
			c.KeepControl()
			req := kreq.(*kmsg.GetTelemetrySubscriptionsRequest)
			resp := req.ResponseKind().(*kmsg.GetTelemetrySubscriptionsResponse)
			resp.PushIntervalMillis = 300000
			return resp, nil, true
		})
	}
	fmt.Println(c.ListenAddrs())
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, os.Interrupt)
	<-ch
	c.Close()
}
