"""The embedded MQTTS broker: amqtt with pacegate's mTLS, identity and topic-ACL rules."""
