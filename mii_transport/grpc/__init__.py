"""The gRPC transport plugin: replica server, load balancer, client, wire codec."""
